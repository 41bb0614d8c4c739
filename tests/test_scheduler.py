"""Continuous batching: requests refill finished rows, and every mode's greedy tokens equal static
batching's (and HF generate's) whatever row a request lands in and whoever shares its batch."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hybridfast import HybridModel
from hybridfast.engine import Engine
from hybridfast.scheduler import Request
from hybridfast.tiny import tiny_model

from .helpers import BASE_PROMPTS, THINK_PROMPTS, pair, router_and_vectors

# ragged prompts, more of them than rows, with early EOS among them (checked below)
PROMPTS = BASE_PROMPTS + [[30, 31, 32, 33], [41], [50, 51, 52, 53, 54, 55, 56], [60, 61], [7, 7, 7]]
THINK = (THINK_PROMPTS * 3)[: len(PROMPTS)]
T = 24


def _hf(m, p, n):
    ref = m.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                     pad_token_id=0)[0, len(p):].tolist()
    return ref[: ref.index(2) + 1] if 2 in ref else ref


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=1)


def test_refilled_rows_match_hf_generate(model):
    static = Engine(model, sync_every=4).generate(PROMPTS, T, eos_token_id=2)
    cont = Engine(model, sync_every=4).generate(PROMPTS, T, eos_token_id=2, rows=3)
    ref = [_hf(model, p, T) for p in PROMPTS]
    assert any(len(r) < T for r in ref), "the fixture needs an early EOS"
    assert cont.sequences() == static.sequences() == ref
    assert torch.allclose(cont.logp, static.logp, atol=1e-5)
    # 3 rows served 12 prompts: rows were refilled, and fewer row-steps went idle
    assert cont.extra["prefills"] > 3 and static.extra["prefills"] == 1
    assert cont.extra["idle_row_steps"] / cont.extra["row_steps"] < \
        static.extra["idle_row_steps"] / static.extra["row_steps"]


def test_per_request_limits_and_stream(model):
    e = Engine(model, sync_every=5)
    limits = [3, 17, 8, 1, 12, 20, 5, 9, 2, 14, 6, 11]
    sched = e.scheduler(2, 32, eos_token_id=2)
    for i, (p, n) in enumerate(zip(PROMPTS, limits)):
        sched.submit(Request((p,), n, i))
    pieces, final = {}, {}
    while sched.busy:
        for c in sched.advance(stream=True):
            if c.finished:
                final[c.index] = c.tokens
            else:
                pieces.setdefault(c.index, []).extend(c.tokens)
    for i, (p, n) in enumerate(zip(PROMPTS, limits)):
        assert final[i] == _hf(model, p, n), f"request {i}"
        assert final[i][: len(pieces.get(i, []))] == pieces.get(i, [])   # deltas are a prefix
    # a request that reaches its limit frees its row at once: no step is spent past it
    assert sched.stats["idle_row_steps"] <= sched.stats["row_steps"] * 0.25


def test_submit_refuses_what_does_not_fit_and_cancel_frees_the_row(model):
    e = Engine(model)
    sched = e.scheduler(1, 30, eos_token_id=2)
    with pytest.raises(ValueError, match="request 7: prompt of 4 tokens \\+ max_new_tokens 27 exceeds"):
        sched.submit(Request(([1, 2, 3, 4],), 27, 7))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        Request(([1],), 0)
    sched.submit(Request(([5, 6],), 20, 0))
    sched.submit(Request(([7, 8],), 8, 1))
    assert sched.advance() == []           # request 0 runs 16 steps; 1 waits for the only row
    assert _hf(model, [5, 6], 20)[15] != 2
    assert sched.cancel(0) and not sched.cancel(0)
    done = {c.index: c.tokens for c in sched.run([])}
    assert list(done) == [1] and done[1] == _hf(model, [7, 8], 8)


def test_sampling_with_refills_is_seeded(model):
    e = Engine(model, sync_every=3)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = e.generate(PROMPTS, 12, temperature=0.9, generator=g(1), rows=4).sequences()
    b = e.generate(PROMPTS, 12, temperature=0.9, generator=g(1), rows=4).sequences()
    c = e.generate(PROMPTS, 12, temperature=0.9, generator=g(2), rows=4).sequences()
    assert a == b and a != c


@pytest.mark.parametrize("mode", ["routed", "paper"])
def test_hybrid_modes_refill_rows(mode):
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=1, steer_layer=2, mode=mode, threshold=0.5 if mode == "routed" else None,
              coefficients=[0.5, 1.0, 0.0, 2.0, 1.5] if mode == "routed" else [0.5, 2.0])
    hm = HybridModel(base, think, sae, vec, sync_every=4, **kw)
    static = hm.generate(PROMPTS, THINK, T, eos_token_id=2)
    cont = hm.generate(PROMPTS, THINK, T, eos_token_id=2, rows=3)
    for a, b in zip(cont.results, static.results):
        assert (a.ids, a.category, a.steered, a.coef) == (b.ids, b.category, b.steered, b.coef)
    assert 0 < static.steered_fraction
    assert cont.stats["prefills"] > 1


def test_compiled_scheduler_compiles_once_per_batch_shape(model):
    """Refills reuse the graph; the drain's shrinking batch (powers of two) adds at most
    log2(rows) graphs, and other prompt lengths add none."""
    ref = Engine(model).generate(PROMPTS, T, eos_token_id=2).sequences()
    cc = CompileCounter()
    e = Engine(model, compile={"backend": cc}, sync_every=4)
    assert e.generate(PROMPTS, T, eos_token_id=2, rows=4).sequences() == ref
    first = cc.frame_count
    assert e.generate(PROMPTS[::-1], T, eos_token_id=2, rows=4).sequences() == ref[::-1]
    assert 2 <= first and cc.frame_count <= 3


def test_batching_benchmark_smoke(tmp_path):
    """bench/bench_batching.py --smoke: same tokens both ways (the script checks), and on a
    workload whose limits vary 10x continuous batching idles far fewer row-steps."""
    import json
    import subprocess
    import sys
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "bench/bench_batching.py", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["schedule"]: x for x in json.loads(out.read_text())["rows"]}
    assert rows["static"]["idle_fraction"] > 0.3 > 0.1 > rows["continuous"]["idle_fraction"]
    assert rows["static"]["tokens"] == rows["continuous"]["tokens"]
