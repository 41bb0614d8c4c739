"""`hybridfast serve`: the official OpenAI client against a live server (uvicorn on a thread, tiny
models). Greedy requests give Engine.generate's / HybridModel.generate's / PowerSampler's tokens
exactly, concurrent requests share the continuous-batching scheduler, streams concatenate to the
full text, bad requests get OpenAI-style 4xx errors, and a client that goes away frees its row."""
import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest
import torch

from hybridfast.artifact_settings import SteeringArtifacts
from hybridfast.artifacts import as_sae, as_vectors
from hybridfast.engine import Engine
from hybridfast.hybrid import HybridModel
from hybridfast.power import PowerSampler
from hybridfast.serving.errors import RequestError
from hybridfast.serving.app import BackgroundServer, create_app
from hybridfast.serving.model_set import ModelSet
from hybridfast.tiny import tiny_pair, tiny_tokenizer

from .helpers import router_and_vectors, steering_artifacts

SAE_LAYER, STEER_LAYER = 1, 2
# a prompt whose greedy continuation has no EOS in its first LONG tokens (checked below): a
# request for LONG tokens is still running when its client goes away
LONG_PROMPT, LONG = "Toula went to", 700


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    base, think = tiny_pair(tok)
    sae, vec = router_and_vectors(base.config.hidden_size, base.config.hidden_size)
    steering = SteeringArtifacts(as_sae(sae), as_vectors(vec), SAE_LAYER, STEER_LAYER)
    return ModelSet("tiny", base, tok, think, tok, steering)


@pytest.fixture(scope="module")
def server(models):
    srv = BackgroundServer(create_app(models, rows=8, max_model_len=1024, max_tokens=800, max_queue=64))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def encode(models, text):
    return models.tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(models, prompts, n):
    """Engine.generate's greedy tokens (EOS included) for each prompt."""
    return Engine(models.base).generate(prompts, n, eos_token_id=models.tokenizer.eos_token_id).sequences()


def questions(k):
    text = resources.files("hybridfast.data").joinpath("gsm8k_test_sample.jsonl").read_text()
    return [json.loads(line)["question"] for line in text.splitlines()[:k]]


def health(server):
    return httpx.get(server.url + "/health").json()


def wait_for(server, ok, timeout=20.0):
    """Poll /health until ``ok(health)``; returns the last health."""
    t0 = time.monotonic()
    while True:
        h = health(server)
        if ok(h) or time.monotonic() - t0 > timeout:
            return h
        time.sleep(0.02)


def plain_greedy_stats(server):
    s = [s for s in health(server)["schedulers"] if s["method"] == "plain" and s["temperature"] == 0]
    return s[0] if s else dict(steps=0, prefills=0)


def error_of(e: openai.APIStatusError):
    return e.status_code, e.body["param"], e.body["message"]


# ------------------------------------------------------------------------------ basics

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(server)
    assert h["status"] == "ok" and h["in_flight"] == 0


def test_greedy_completion_equals_engine(models, client):
    text = "Natalia sold clips to 48 of her friends"
    ids = encode(models, text)
    ref = greedy(models, [ids], 40)[0]
    for prompt in (text, ids):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                      extra_body=dict(return_token_ids=True))
        c = r.choices[0]
        assert c.token_ids == ref
        assert c.text == models.tokenizer.decode(ref, skip_special_tokens=True)
        assert c.finish_reason == ("stop" if ref[-1] == models.tokenizer.eos_token_id else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))


def test_16_concurrent_requests_share_the_scheduler(models, server, client):
    prompts = [" ".join(q.split()[: 3 + i % 7]) for i, q in enumerate(questions(16))]
    limits = [4 + 3 * i for i in range(16)]
    ids = [encode(models, p) for p in prompts]
    ref = [seq[:n] for seq, n in zip(greedy(models, ids, max(limits)), limits)]
    assert any(len(r) < n for r, n in zip(ref, limits)), "the fixture needs a request that ends with EOS"
    before = plain_greedy_stats(server)

    def ask(i):
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=limits[i], temperature=0,
                                      extra_body=dict(return_token_ids=True))
        return r.choices[0].token_ids

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == ref
    after = plain_greedy_stats(server)
    # 16 requests on 8 rows: they were admitted as rows freed, and decoded together
    assert after["prefills"] - before["prefills"] > 1
    assert after["steps"] - before["steps"] < sum(map(len, ref)) / 2


def test_stream_deltas_concatenate_to_the_full_text(models, client):
    prompt = "Weng earns $12 an hour for babysitting"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0,
                                     extra_body=dict(return_token_ids=True)).choices[0]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stream=True,
                                            stream_options=dict(include_usage=True),
                                            extra_body=dict(return_token_ids=True)))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == full.text
    assert sum((p.token_ids for p in pieces), []) == full.token_ids
    assert [p.finish_reason for p in pieces][-1] == full.finish_reason
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert chunks[-1].usage.completion_tokens == len(full.token_ids)


def test_chat_applies_the_chat_template(models, client):
    messages = [dict(role="system", content="Be brief."), dict(role="user", content="What is 2 + 3?")]
    text = models.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = greedy(models, [encode(models, text)], 30)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                       extra_body=dict(return_token_ids=True))
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].token_ids == ref
    assert r.choices[0].message.content == models.tokenizer.decode(ref, skip_special_tokens=True)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == r.choices[0].message.content


def test_stop_strings_cut_text_and_tokens(models, client):
    prompt = "Betty is saving money for a new wallet"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0,
                                     extra_body=dict(return_token_ids=True)).choices[0]
    stop = full.text[20:23]
    assert len(stop) == 3 and "\ufffd" not in stop
    cut = full.text.index(stop)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stop=[stop, "never seen"],
                                  extra_body=dict(return_token_ids=True)).choices[0]
    assert (r.text, r.finish_reason) == (full.text[:cut], "stop")
    k = len(r.token_ids)          # the tokens end with the one that completed the stop string
    assert r.token_ids == full.token_ids[:k]
    decode = lambda t: models.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    assert stop in decode(full.token_ids[:k]) and stop not in decode(full.token_ids[: k - 1])
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=60, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.text


def test_n_choices_and_prompt_batches(models, client):
    prompts = ["Janet's ducks lay 16 eggs", "A robe takes 2 bolts"]
    ref = greedy(models, [encode(models, p) for p in prompts], 12)
    r = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=12, temperature=0,
                                  extra_body=dict(return_token_ids=True))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in r.choices] == [ref[0], ref[0], ref[1], ref[1]]


# ------------------------------------------------------------------------------ methods

@pytest.mark.parametrize("mode,extra", [("routed", {}), ("routed", dict(threshold=0.5)), ("paper", {})])
def test_hybrid_methods_equal_hybrid_model(models, client, mode, extra):
    ids = encode(models, "Carla is downloading a 200 GB file")
    st = models.steering
    hm = HybridModel(models.base, models.thinking, st.sae, st.vectors, sae_layer=SAE_LAYER, steer_layer=STEER_LAYER,
                     mode=mode, **extra)
    ref = hm.generate([ids], [ids], 24, eos_token_id=models.tokenizer.eos_token_id)[0]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0,
                                  extra_body=dict(method=f"hybrid-{mode}", return_token_ids=True, **extra))
    assert r.choices[0].token_ids == ref.ids
    if mode == "routed" and not extra:
        assert any(ref.steered), "the fixture must steer"


def test_power_methods(models, client):
    ids = encode(models, "John drives for 3 hours")
    settings = dict(alpha=2.0, block_size=6, n_mcmc=2)
    ps = PowerSampler(models.base, **settings, max_new_tokens=18, eos_token_id=models.tokenizer.eos_token_id)
    ref = ps.sample([ids, ids], generator=torch.Generator().manual_seed(7))
    r = client.completions.create(model="tiny", prompt=ids, n=2, max_tokens=18,
                                  extra_body=dict(method="power-mh", seed=7, return_token_ids=True, **settings))
    assert [c.token_ids for c in r.choices] == [x.ids for x in ref]      # a seeded power job is reproducible
    smc = dict(model="tiny", prompt=ids, max_tokens=10, extra_body=dict(method="power-smc", alpha=2.0, n_particles=3,
                                                                        seed=1, return_token_ids=True))
    a, b = client.completions.create(**smc).choices[0], client.completions.create(**smc).choices[0]
    assert a.token_ids == b.token_ids and 1 <= len(a.token_ids) <= 10
    scalable = dict(alpha=2.0, n_candidates=2, n_rollouts=2, horizon=3)
    ps = PowerSampler(models.base, method="scalable", **scalable, max_new_tokens=6,
                      eos_token_id=models.tokenizer.eos_token_id)
    ref = ps.sample([ids], generator=torch.Generator().manual_seed(5))[0]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6,
                                  extra_body=dict(method="power-scalable", seed=5, return_token_ids=True, **scalable))
    assert r.choices[0].token_ids == ref.ids


# ------------------------------------------------------------------------------ refusals

BAD = [
    (dict(max_tokens=801), 400, "max_tokens", "exceeds this server's bound of 800 (--max-tokens)"),
    (dict(max_tokens=0), 400, "max_tokens", "max_tokens must be >= 1, got 0"),
    (dict(method="hybrid-fast"), 400, "method", "unknown method 'hybrid-fast'; choose from plain,"),
    (dict(model="gpt-4"), 404, "model", "model 'gpt-4' is not served here"),
    (dict(prompt=""), 400, "prompt", "prompt 0 is empty (no tokens)"),
    (dict(prompt=[]), 400, "prompt", "prompt is empty"),
    (dict(prompt=[5, 100000]), 400, "prompt", "token ids outside the vocabulary"),
    (dict(temperature=-0.5), 400, "temperature", "temperature must be >= 0, got -0.5"),
    (dict(logprobs=1), 400, "logprobs", "logprobs=1 is not supported"),
    (dict(echo=True), 400, "echo", "echo=True is not supported"),
    (dict(top_p=0.9), 400, "top_p", "nucleus sampling is not implemented"),
    (dict(n=9), 400, "n", "n must be in [1, 8] (--rows), got 9"),
    (dict(stop=[""]), 400, "stop", "stop takes up to 4 non-empty strings"),
    (dict(seed=3, temperature=0.7), 400, "seed", "seed is not supported for sampled plain requests"),
    (dict(alpha=2.0), 400, "alpha", "alpha is not a setting of method plain (it is one of power-mh, power-smc, power-scalable)"),
    (dict(method="power-mh", alpha=0.5), 400, "alpha", "alpha must be >= 1, got 0.5"),
    (dict(method="power-smc", ess_threshold=1.5), 400, "ess_threshold", "ess_threshold must be in (0, 1]"),
    (dict(method="power-mh", temperature=0.3), 400, "temperature", "temperature is not a setting of power-mh"),
    (dict(method="power-scalable", variant="tree"), 400, "variant", "variant must be 'token' or 'block', got 'tree'"),
    (dict(method="power-scalable", top_k=5), 400, "top_k", "top_k is not a setting of method power-scalable"),
    (dict(method="power-scalable", jackknife=True, n_rollouts=1), 400, None, "it needs n_rollouts (M) >= 2"),
    (dict(method="hybrid-paper", temperature=0.3), 400, "temperature", "hybrid-paper is greedy"),
    (dict(method="plain", block_size=4), 400, "block_size", "block_size is not a setting of method plain"),
    (dict(prompt="x" * 3000), 400, "prompt", "this server holds 1024 tokens per request"),
    (dict(nonsense=1), 400, "nonsense", "nonsense: Extra inputs are not permitted"),
    (dict(max_tokens="many"), 400, "max_tokens", "max_tokens: Input should be a valid integer"),
]


@pytest.mark.parametrize("change,status,param,message", BAD)
def test_bad_requests_get_openai_errors(server, change, status, param, message):
    body = dict(dict(model="tiny", prompt="Hello", max_tokens=4), **change)
    r = httpx.post(server.url + "/v1/completions", json=body)
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["type"]) == (status, param, "invalid_request_error")
    assert message in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_malformed_bodies_and_routes(server, client):
    post = lambda path, **kw: httpx.post(server.url + path, **kw)  # noqa: E731
    r = post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")
    r = post("/v1/completions", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body must be a JSON object")
    r = post("/v1/chat/completions", json=dict(model="tiny", messages=[dict(role="robot", content="hi")]))
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages.0.role")
    r = post("/v1/chat/completions", json=dict(model="tiny", messages=[]))
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages")
    r = post("/v1/chat/completions", json=dict(model="tiny", messages=[dict(role="user", content="hi")],
                                               tools=[dict(type="function")]))
    assert (r.status_code, r.json()["error"]["param"]) == (400, "tools")
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]
    with pytest.raises(openai.BadRequestError) as e:             # the official client sees the same errors
        client.completions.create(model="tiny", prompt="Hi", max_tokens=5000)
    assert error_of(e.value)[:2] == (400, "max_tokens")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=5)
    assert health(server)["in_flight"] == 0


def test_chat_refusals_name_the_field(server):
    chat = lambda **kw: httpx.post(server.url + "/v1/chat/completions", json=dict(  # noqa: E731
        dict(model="tiny", messages=[dict(role="user", content="hi")], max_tokens=4), **kw))
    # a participant name the chat template would drop is refused, not ignored
    r = chat(messages=[dict(role="user", content="hi"), dict(role="user", content="hello", name="bob")])
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["code"]) == (400, "messages.1.name", "unsupported")
    assert "messages.1.name='bob' is not supported" in err["message"]
    # a bound that max_completion_tokens breaks names max_completion_tokens
    r = chat(max_tokens=None, max_completion_tokens=801)
    err = r.json()["error"]
    assert (r.status_code, err["param"]) == (400, "max_completion_tokens")
    assert "max_completion_tokens 801 exceeds this server's bound of 800" in err["message"]


def test_hybrid_methods_need_steering(models):
    plain_only = ModelSet("tiny", models.base, models.tokenizer)
    srv = BackgroundServer(create_app(plain_only, rows=2, max_model_len=64, max_tokens=8))
    try:
        r = httpx.post(srv.url + "/v1/completions", json=dict(model="tiny", prompt="Hi", method="hybrid-routed"))
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (400, "method", "method_unavailable")
        assert "it serves plain, power-mh, power-smc, power-scalable" in err["message"]
    finally:
        srv.stop()


def test_token_id_prompts_reach_the_thinking_model_as_its_own_ids():
    """The thinking tokenizer may give the added (special, chat-marker) tokens other ids than the
    base tokenizer: a token-id prompt of a hybrid request reaches the thinking model translated,
    as the same prompt sent as text would, and a token it lacks is refused."""
    from hybridfast.serving.methods import Settings
    from hybridfast.serving.server import Server
    tok_b, tok_t = tiny_tokenizer(), tiny_tokenizer()
    tok_b.add_tokens(["<|a|>", "<|b|>", "<|only-base|>"])
    tok_t.add_tokens(["<|b|>", "<|a|>"])
    base, think = tiny_pair(tok_b)
    sae, vec = router_and_vectors(base.config.hidden_size, base.config.hidden_size)
    models = ModelSet("tiny", base, tok_b, think, tok_t,
                      SteeringArtifacts(as_sae(sae), as_vectors(vec), SAE_LAYER, STEER_LAYER))
    text = "<|a|>Janet's ducks<|b|> lay"
    ids_b, ids_t = (t(text, add_special_tokens=False)["input_ids"] for t in (tok_b, tok_t))
    assert ids_b != ids_t and len(ids_b) == len(ids_t)        # the fixture: ids differ, tokens do not
    srv = Server(models, rows=2, max_model_len=64, max_tokens=8)
    for method in ("hybrid-paper", "hybrid-routed"):
        assert srv.completion_prompts(ids_b, Settings(method)) == [(ids_b, ids_t)]
        assert srv.completion_prompts(text, Settings(method)) == [(ids_b, ids_t)]
    assert srv.completion_prompts(ids_b, Settings("plain")) == [(ids_b,)]
    only = tok_b.convert_tokens_to_ids("<|only-base|>")
    with pytest.raises(RequestError, match=r"prompt 0 has token ids the thinking model's tokenizer has no token for: "
                                           rf"\{{{only}: '<\|only-base\|>'\}}") as e:
        srv.completion_prompts(ids_b + [only], Settings("hybrid-paper"))
    assert (e.value.status, e.value.param) == (400, "prompt")


def test_schedulers_do_not_share_sampling_noise(models):
    """An unseeded sampled request draws fresh noise: a scheduler made again (after its idle
    predecessor was dropped for another setting) does not replay the samples it gave before."""
    from hybridfast.serving.methods import Settings
    from hybridfast.serving.worker import Job, Tokens, Worker
    ids = encode(models, "Natalia sold clips to")
    worker = Worker(models, rows=2, max_model_len=64, max_schedulers=1)

    def run(s):
        got = []
        worker.submit(Job(s, [(ids,)], 20, worker.new_ids(1),
                          lambda ev: got.extend(ev.tokens if isinstance(ev, Tokens) else [])))
        worker.drain()
        return got
    first = run(Settings("plain", 1.0))
    run(Settings("plain", 0.0))                       # drops the sampled scheduler (max_schedulers=1)
    again = run(Settings("plain", 1.0))
    assert len(first) >= 5 and first != again


# ------------------------------------------------------------------------------ disconnects and bounds

def long_request_precondition(models):
    ids = encode(models, LONG_PROMPT)
    assert len(greedy(models, [ids], LONG)[0]) == LONG, "LONG_PROMPT must not reach EOS within LONG tokens"


def test_client_disconnect_cancels_and_frees_the_row(models, server, client):
    long_request_precondition(models)
    before = health(server)["cancelled"]
    stream = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=LONG, temperature=0, stream=True)
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()                                   # the client goes away mid-stream
    h = wait_for(server, lambda h: h["cancelled"] > before and h["in_flight"] == 0)
    assert h["cancelled"] == before + 1 and h["in_flight"] == 0 and h["running_choices"] == 0
    assert all(s["busy_rows"] == 0 and s["queued"] == 0 for s in h["schedulers"])
    with pytest.raises(httpx.ReadTimeout):           # a non-streaming client that gives up
        httpx.post(server.url + "/v1/completions", timeout=0.3,
                   json=dict(model="tiny", prompt=LONG_PROMPT, max_tokens=LONG, temperature=0))
    h = wait_for(server, lambda h: h["cancelled"] > before + 1 and h["in_flight"] == 0)
    assert h["cancelled"] == before + 2 and h["in_flight"] == 0
    assert all(s["busy_rows"] == 0 for s in h["schedulers"])


def test_queue_and_scheduler_bounds(models):
    long_request_precondition(models)
    srv = BackgroundServer(create_app(ModelSet("tiny", models.base, models.tokenizer), rows=4, max_model_len=1024,
                                      max_tokens=800, max_queue=2, max_schedulers=1))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=LONG, temperature=0,
                                           stream=True)
        next(iter(stream))                            # one choice in flight, on the only scheduler
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=4, n=2, temperature=0)
        assert (e.value.status_code, e.value.body["code"]) == (503, "server_busy")
        assert "at most 2 (--max-queue)" in e.value.body["message"]
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0.5)
        assert (e.value.status_code, e.value.body["code"]) == (503, "schedulers_busy")
        stream.close()
        wait_for(srv, lambda h: h["in_flight"] == 0)
        r = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0.5)
        assert r.usage.completion_tokens >= 1          # the idle scheduler made room
        assert [s["temperature"] for s in health(srv)["schedulers"]] == [0.5]
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ command line

def test_serve_help_documents_every_flag(monkeypatch):
    from hybridfast import cli

    class Parsed(Exception):
        pass

    def capture(self, *a, **k):
        raise Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as e:
        cli.main(["serve"])
    parser = e.value.args[0]
    assert parser.description and "serve" in cli.COMMANDS
    assert [a.dest for a in parser._actions if not a.help or a.help == argparse.SUPPRESS] == []


def test_serve_refuses_bad_flags(capsys):
    from hybridfast.serving.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--max-tokens", "64", "--max-model-len", "64"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("hybridfast: error: --max-tokens 64 must be below --max-model-len 64 "
                                       "(a prompt needs at least one token)\n")


def test_serve_command_runs_a_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "hybridfast.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--max-model-len", "128", "--max-tokens", "16", "--rows", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 90, "the server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "hybridfast serve: tiny (plain, power-mh, power-smc, power-scalable) on http://127.0.0.1:" in out


def test_import_hybridfast_does_not_import_the_server_stack():
    code = ("import sys, hybridfast, hybridfast.cli, hybridfast.serving; "
            "print([m for m in ('fastapi', 'uvicorn', 'starlette', 'lm_eval', 'openai') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr


def test_bench_serve_smoke(tmp_path):
    """bench/bench_serve.py --smoke runs and writes one row per concurrency level."""
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "bench/bench_serve.py", "--smoke", "--out", str(out)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["clients"] for row in rows] == [1, 2]
    assert all(row["requests"] == 3 and row["completion_tokens"] >= 3 and row["p99_s"] >= row["p50_s"] > 0
               for row in rows)


def test_artifact_folders_load_as_the_other_commands_and_set_routing(tmp_path):
    from hybridfast.errors import UserError
    from hybridfast.serving.methods import METHODS, Settings
    from hybridfast.serving.model_set import load_model_set
    from hybridfast.serving.worker import Job, Tokens, Worker
    sae, vec = steering_artifacts(tmp_path, threshold=1e9)          # a threshold nothing passes
    models = load_model_set("tiny", sae=sae, vectors=vec)
    assert models.methods == METHODS and models.routing == dict(threshold=1e9)
    assert (models.steering.sae_layer, models.steering.steer_layer) == (3, 2)
    with pytest.raises(UserError, match="--sae and --vectors go together"):
        load_model_set("tiny", sae=sae)
    # a routed request without a threshold uses the one the vectors record
    ids = encode(models, "Mishka bought 3 pairs of shorts")
    got = []
    worker = Worker(models, rows=2, max_model_len=64, max_schedulers=1)
    worker.submit(Job(Settings("hybrid-routed"), [(ids, ids)], 16, worker.new_ids(1),
                      lambda ev: got.extend(ev.tokens if isinstance(ev, Tokens) else [])))
    worker.drain()
    st = models.steering
    routed = {thr: HybridModel(models.base, models.thinking, st.sae, st.vectors, sae_layer=3, steer_layer=2,
                               mode="routed", threshold=thr).generate([ids], [ids], 16,
                                                                       eos_token_id=models.tokenizer.eos_token_id)[0]
              for thr in (1e9, None)}
    assert got == routed[1e9].ids and not any(routed[1e9].steered)
    assert got != routed[None].ids                  # the default threshold would have steered
