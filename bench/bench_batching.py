"""Continuous vs static batching on a workload whose answer lengths vary 10x: tokens/s and the
fraction of row-steps spent on rows that had already finished (or were empty).

    python bench/bench_batching.py                         # SmolLM2-135M, GSM8K prompts, CPU
    python bench/bench_batching.py --config qwen2.5-1.5b --requests 64 --rows 16   # random weights
    python bench/bench_batching.py --smoke                 # seconds (tiny model), checks the script

Every request has its own token limit, spread evenly over ``[L, 10 L]`` and shuffled (so both
schedules see the same mix); EOS ends a request earlier. *Static* batching runs the requests
``rows`` at a time, each batch until its longest request ends (what fixed batches do);
*continuous* keeps ``rows`` rows busy, admitting the next request into a row as soon as it
frees (:mod:`hybridfast.scheduler`). Both produce the same greedy tokens; the script checks it.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_model, env_info, parse_with_smoke, result_path, sync, table, write  # noqa: E402

from hybridfast.datasets import load_problems  # noqa: E402
from hybridfast.engine import Engine  # noqa: E402
from hybridfast.models import DEFAULT_MODEL  # noqa: E402
from hybridfast.prompts import BASE_TEMPLATE, base_prompt  # noqa: E402
from hybridfast.scheduler import Request  # noqa: E402

SMOKE = dict(config="tiny-qwen2", requests=12, rows=4, min_tokens=2)


def workload(a, tok, vocab: int, g: random.Random) -> list[Request]:
    """``a.requests`` requests with limits spread over [min, 10 min], shuffled."""
    n, lo = a.requests, a.min_tokens
    limits = [lo + round(i * 9 * lo / max(1, n - 1)) for i in range(n)]
    g.shuffle(limits)
    if tok is not None:
        qs = [p["question"] for p in load_problems("gsm8k", limit=n)]
        prompts = [tok(base_prompt(qs[i % len(qs)], BASE_TEMPLATE), add_special_tokens=False)["input_ids"]
                   for i in range(n)]
    else:
        prompts = [[g.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(n)]
    return [Request((p,), m, i) for i, (p, m) in enumerate(zip(prompts, limits))]


def schedule(engine: Engine, reqs: list[Request], rows: int, continuous: bool, eos) -> tuple[dict, dict]:
    """Run ``reqs`` continuously (one scheduler) or statically (one per batch of ``rows``);
    returns (tokens by request, summed scheduler counts)."""
    cap = max(len(r.prompts[0]) + r.max_new_tokens for r in reqs)
    batches = [reqs] if continuous else [reqs[i: i + rows] for i in range(0, len(reqs), rows)]
    tokens, stats = {}, {}
    for batch in batches:
        sched = engine.scheduler(rows, cap, eos_token_id=eos, compact=continuous)
        tokens.update({c.index: c.tokens for c in sched.run(batch)})
        for k, v in sched.stats.items():
            stats[k] = stats.get(k, 0) + v
    return tokens, stats


def run(a, model, tok, eos) -> list[dict]:
    reqs = workload(a, tok, model.config.vocab_size, random.Random(a.seed))
    rows, ref = [], None
    for compiled in a.compile:
        engine = Engine(model, compile=compiled, sync_every=a.sync_every)
        for continuous in (False, True):
            schedule(engine, reqs[: a.rows], a.rows, continuous, eos)      # warm-up / compile
            sync()
            t0 = time.perf_counter()
            tokens, st = schedule(engine, reqs, a.rows, continuous, eos)
            sync()
            dt = time.perf_counter() - t0
            if ref is None:
                ref = tokens
            if tokens != ref:
                raise SystemExit("continuous and static batching gave different greedy tokens")
            n = sum(len(t) for t in tokens.values())
            rows.append(dict(schedule="continuous" if continuous else "static", compiled=compiled,
                             rows=a.rows, requests=len(reqs), tokens=n, seconds=dt, tok_s=n / dt,
                             idle_fraction=st["idle_row_steps"] / st["row_steps"], **st))
            print(rows[-1], flush=True)
    lengths = [len(t) for t in ref.values()]
    for r in rows:
        r["answer_lengths_min_max"] = [min(lengths), max(lengths)]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model path, hub id or named default")
    ap.add_argument("--config", help="a bundled config with random weights instead of --model")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--min-tokens", type=int, default=16, help="shortest limit; the longest is 10x")
    ap.add_argument("--prompt-len", type=int, default=48, help="--config: random prompt tokens")
    ap.add_argument("--sync-every", type=int, default=16)
    ap.add_argument("--compile", type=int, nargs="+", default=[0], choices=[0, 1],
                    help="0: eager, 1: compile=True (both: 0 1)")
    ap.add_argument("--seed", type=int, default=0)
    a = parse_with_smoke(ap, argv, SMOKE)
    a.compile = [bool(c) for c in a.compile]
    out = result_path(ap, a, "batching-" + (a.config or os.path.basename(a.model.rstrip("/")).lower()))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, eos = bench_model(a, dev)
    rows = run(a, model, tok, eos)
    print(table(rows, ["schedule", "compiled", "rows", "tokens", "tok_s", "idle_fraction", "steps",
                       "prefills"]))
    write(out.stem, dict(env=env_info(), args=vars(a), rows=rows), out)


if __name__ == "__main__":
    main()
