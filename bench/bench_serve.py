"""Load test of `hybridfast serve`: requests/s, tokens/s and p50/p99 latency (whole request and
time to first token) at 1, 8 and 32 concurrent clients.

    python bench/bench_serve.py                                  # SmolLM2-135M, plain greedy, CPU
    python bench/bench_serve.py --model tiny --rows 8            # tiny random model
    python bench/bench_serve.py --smoke                          # seconds: checks the script runs

The server runs in this process (uvicorn on a thread, the models on the server's worker thread),
with the limits given here. Each level runs ``--requests`` requests (at least one per client):
``--concurrency`` client threads send them back to back to /v1/completions,
streaming (httpx, TCP_NODELAY), so each request's latency and its time to first token are
measured where a client sees them. Prompts are GSM8K questions in the base task template; every request asks for
``--max-tokens`` tokens (EOS ends it earlier). One warm-up request runs before the levels.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import env_info, parse_with_smoke, result_path, show_warnings_once, table, write  # noqa: E402

SMOKE = dict(model="tiny", rows=2, requests=3, concurrency=[1, 2], max_tokens=4, max_model_len=512)


def percentile(values: list, q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def http_client(clients: int):
    """An HTTP client for ``clients`` threads, with TCP_NODELAY: without it every request waits
    ~40 ms for a delayed ACK (Nagle), a client artifact that would swamp the server's latency."""
    import httpx
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(transport=httpx.HTTPTransport(socket_options=nodelay), timeout=600,
                        limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))


def one_request(http, url: str, model: str, prompt: str, a) -> dict:
    """Send one streaming request; its latency, time to first token and completion tokens."""
    body = dict(model=model, prompt=prompt, max_tokens=a.max_tokens, temperature=a.temperature, stream=True,
                stream_options=dict(include_usage=True), method=a.method)
    t0 = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server refused a request: {r.status_code} {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise SystemExit(f"a request failed: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return dict(latency=latency, ttft=latency if first is None else first, tokens=tokens)


def level(http, url: str, model: str, prompts: list, a, clients: int) -> dict:
    """Run max(--requests, clients) requests from ``clients`` threads; the level's numbers."""
    n = max(a.requests, clients)
    results, lock, next_index = [], threading.Lock(), iter(range(n))

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            r = one_request(http, url, model, prompts[i % len(prompts)], a)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return dict(clients=clients, requests=n, seconds=wall, req_s=n / wall, tok_s=tokens / wall,
                completion_tokens=tokens, p50_s=percentile(lat, 50), p99_s=percentile(lat, 99),
                ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99))


def prompts_for(n: int) -> list:
    from hybridfast.datasets import load_problems
    from hybridfast.prompts import BASE_TEMPLATE, base_prompt
    return [base_prompt(p["question"], BASE_TEMPLATE) for p in load_problems("gsm8k", limit=n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="base model: 'tiny', a named model, a GGUF file or "
                                                            "folder, a Hugging Face folder or hub id "
                                                            "(default: %(default)s)")
    ap.add_argument("--thinking", help="thinking model (hybrid methods)")
    ap.add_argument("--sae", help="SAE folder (hybrid methods)")
    ap.add_argument("--vectors", help="steering-vectors folder (hybrid methods)")
    ap.add_argument("--method", default="plain", help="the requests' method (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, help="the requests' temperature (default: greedy)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                    help="concurrent clients per level (default: 1 8 32)")
    ap.add_argument("--requests", type=int, default=64, help="requests per level, at least one per client "
                                                             "(default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=16, help="server --rows (default: %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="server --max-model-len (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="server --seed (default: %(default)s)")
    a = parse_with_smoke(ap, argv, SMOKE)
    out = result_path(ap, a, "serve-" + os.path.basename(a.model.rstrip("/")).lower())
    show_warnings_once()
    from hybridfast.serving.app import BackgroundServer, create_app
    from hybridfast.serving.model_set import load_model_set
    models = load_model_set(a.model, thinking=a.thinking, sae=a.sae, vectors=a.vectors, seed=a.seed)
    srv = BackgroundServer(create_app(models, rows=a.rows, max_model_len=a.max_model_len, max_tokens=a.max_tokens,
                                      max_queue=max(a.concurrency) * 2, seed=a.seed))
    try:
        http = http_client(max(a.concurrency))
        prompts = prompts_for(max(a.requests, max(a.concurrency)))
        one_request(http, srv.url, models.name, prompts[0], a)                 # warm-up
        rows = []
        for clients in a.concurrency:
            rows.append(level(http, srv.url, models.name, prompts, a, clients))
            print(rows[-1], flush=True)
    finally:
        srv.stop()
    print(table(rows, ["clients", "requests", "req_s", "tok_s", "p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s"]))
    write(out.stem, dict(env=env_info(), args=vars(a), rows=rows), out)


if __name__ == "__main__":
    main()
