"""compile=: every decode step compiles with fullgraph=True (so no graph break and no host sync
inside a step), once per batch shape, and gives the eager tokens."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hybridfast import HybridModel, PowerSampler
from hybridfast.compiled import CAPACITY_BUCKET, bucketed, compile_options
from hybridfast.engine import Engine
from hybridfast.tiny import tiny_model

from .helpers import BASE_PROMPTS, THINK_PROMPTS, pair, router_and_vectors

T = 64
OTHER_B = [[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3], [20, 21, 22]]       # other prompt lengths
OTHER_T = [[7, 8], [9, 10, 11, 12], [13]]


def _ids(out):
    return [r.ids for r in out]


def test_plain_engine_compiles_once_and_matches_eager():
    m = tiny_model("qwen2", seed=1)
    for kw in (dict(), dict(temperature=0.8, top_k=20)):
        g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
        ref = Engine(m).generate(BASE_PROMPTS, T, eos_token_id=2, generator=g(), **kw)
        cc = CompileCounter()
        e = Engine(m, compile={"backend": cc})
        assert e.generate(BASE_PROMPTS, T, eos_token_id=2, generator=g(), **kw).sequences() == \
            ref.sequences()
        assert cc.frame_count == 1
        e.generate(OTHER_B, T, eos_token_id=2, generator=g(), **kw)
        assert cc.frame_count == 1, "a new prompt length must not recompile the step"


@pytest.mark.parametrize("mode", ["routed", "paper"])
def test_hybrid_steps_compile_once_and_match_eager(mode):
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=1, steer_layer=2, mode=mode, threshold=0.5 if mode == "routed" else None,
              coefficients=[0.5, 1.0, 0.0, 2.0, 1.5] if mode == "routed" else [0.5, 2.0])
    ref = HybridModel(base, think, sae, vec, **kw).generate(BASE_PROMPTS, THINK_PROMPTS, T, eos_token_id=2)
    cc = CompileCounter()
    hm = HybridModel(base, think, sae, vec, compile={"backend": cc}, **kw)
    out = hm.generate(BASE_PROMPTS, THINK_PROMPTS, T, eos_token_id=2)
    assert _ids(out) == _ids(ref) and [r.category for r in out] == [r.category for r in ref]
    assert [r.steered for r in out] == [r.steered for r in ref] and out.steered_fraction > 0
    hm.generate(OTHER_B, OTHER_T, T, eos_token_id=2)
    assert cc.frame_count == 1


@pytest.mark.parametrize("method", ["mh", "smc"])
def test_power_step_compiles_once_and_matches_eager(method):
    m = tiny_model("qwen2", seed=1)
    kw = dict(max_new_tokens=24, block_size=6, n_mcmc=2, method=method, n_particles=4, eos_token_id=2)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ref = PowerSampler(m, **kw).sample(BASE_PROMPTS[:2], n_chains=2, generator=gen())
    cc = CompileCounter()
    ps = PowerSampler(m, compile={"backend": cc}, **kw)
    assert _ids(ps.sample(BASE_PROMPTS[:2], n_chains=2, generator=gen())) == _ids(ref)
    ps.sample(OTHER_B[:2], n_chains=2, generator=gen())
    assert cc.frame_count == 1


def test_steered_power_step_compiles_and_matches_eager():
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    hm = HybridModel(base, think, sae, vec, mode="routed", sae_layer=1, steer_layer=2, threshold=0.5)
    kw = dict(max_new_tokens=16, block_size=4, n_mcmc=2, eos_token_id=2, steer=hm)
    args = (BASE_PROMPTS[:2],)
    ref = PowerSampler(base, **kw).sample(*args, thinking_prompts=THINK_PROMPTS[:2],
                                          generator=torch.Generator().manual_seed(3))
    cc = CompileCounter()
    out = PowerSampler(base, compile={"backend": cc}, **kw).sample(
        *args, thinking_prompts=THINK_PROMPTS[:2], generator=torch.Generator().manual_seed(3))
    assert _ids(out) == _ids(ref) and cc.frame_count == 1


def test_inductor_compiled_engine_matches_generate():
    """compile=True: the real inductor backend (C++ codegen on CPU) against HF generate."""
    m = tiny_model("llama", seed=2)
    out = Engine(m, compile=True).generate(BASE_PROMPTS, 24, eos_token_id=2).sequences()
    for p, got in zip(BASE_PROMPTS, out):
        ref = m.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                         pad_token_id=0)[0, len(p):].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2) + 1]
        assert got == ref


def test_compile_options_and_buckets():
    assert compile_options(False, "cpu") is None
    assert compile_options(True, "cpu") == dict(fullgraph=True, dynamic=False)
    assert compile_options(True, "cuda")["mode"] == "reduce-overhead"
    assert compile_options({"backend": "eager"}, "cpu")["backend"] == "eager"
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        compile_options("yes", "cpu")
    opts = compile_options(True, "cpu")
    assert bucketed(1, opts) == CAPACITY_BUCKET and bucketed(CAPACITY_BUCKET + 1, opts) == 2 * CAPACITY_BUCKET
    assert bucketed(77, None) == 77


def test_flex_attention_path_matches_sdpa():
    """attention="flex" (FlexAttention with a block mask, meant for compiled CUDA steps) gives the
    SDPA path's tokens in prefill, decode and paper-mode candidate rows, eager and traced."""
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    ref = Engine(base).generate(BASE_PROMPTS, 8, eos_token_id=2).sequences()
    assert Engine(base, attention="flex").generate(BASE_PROMPTS, 8, eos_token_id=2).sequences() == ref
    cc = CompileCounter()
    out = Engine(base, attention="flex", compile={"backend": cc}).generate(BASE_PROMPTS, 8, eos_token_id=2)
    assert out.sequences() == ref and cc.frame_count == 1
    kw = dict(sae_layer=2, steer_layer=1, coefficients=[0.5, 2.0])
    p_ref = HybridModel(base, think, sae, vec, **kw).generate(BASE_PROMPTS, THINK_PROMPTS, 8, eos_token_id=2)
    p_flex = HybridModel(base, think, sae, vec, attention="flex", **kw).generate(
        BASE_PROMPTS, THINK_PROMPTS, 8, eos_token_id=2)
    assert _ids(p_flex) == _ids(p_ref)
    with pytest.raises(ValueError, match="attention must be one of"):
        Engine(base, attention="flash")
