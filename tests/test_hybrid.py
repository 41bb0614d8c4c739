"""Hybrid generation: engine (both modes) against the naive baselines, token for token."""
import pytest
import torch

from hybridfast import HybridModel
from hybridfast.baselines import paper_mode_recompute, routed_generate_hooks
from hybridfast.engine import Engine

from .helpers import BASE_PROMPTS, THINK_PROMPTS, pair, router_and_vectors

T = 20


@pytest.mark.parametrize("family,sae_layer", [("qwen2", 2), ("llama", 2), ("qwen2", 3)])
def test_paper_mode_matches_recompute(family, sae_layer):
    """Also with the router at the last block, whose Hugging Face ``hidden_states`` entry has the
    final norm applied (the recompute reads the block's own output, as the router does)."""
    base, think = pair(family)
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=sae_layer, steer_layer=1, coefficients=[0.5, 1.0, 2.0])
    out = HybridModel(base, think, sae, vec, **kw).generate(BASE_PROMPTS, THINK_PROMPTS, T, eos_token_id=2)
    ref = paper_mode_recompute(HybridModel(base, think, sae, vec, **kw), BASE_PROMPTS,
                               THINK_PROMPTS, T, eos_token_id=2)
    plain = Engine(base).generate(BASE_PROMPTS, T, eos_token_id=2).sequences()
    n_steered = n_tokens = 0
    for a, b, p in zip(out.results, ref.results, plain):
        assert a.ids == b.ids
        assert a.category == b.category and a.steered == b.steered and a.coef == b.coef
        n_steered += sum(a.steered)
        n_tokens += len(a.ids)
    # both branches of the gate were exercised, and steering changed the output
    assert 0 < n_steered < n_tokens
    assert [r.ids for r in out.results] != plain
    assert 0 < out.steered_fraction < 1 and 0 < out.steered_fraction_tokens < 1


def test_paper_mode_threshold_matches_recompute():
    """A category below the threshold is not steered: the base token with coefficient 0, also
    where the gate fails (the candidate search must not run on it)."""
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=2, steer_layer=1, coefficients=[0.5, 1.0, 2.0], threshold=2.0)
    out = HybridModel(base, think, sae, vec, **kw).generate(BASE_PROMPTS, THINK_PROMPTS, T, eos_token_id=2)
    ref = paper_mode_recompute(HybridModel(base, think, sae, vec, **kw), BASE_PROMPTS,
                               THINK_PROMPTS, T, eos_token_id=2)
    below = 0
    for a, b in zip(out.results, ref.results):
        assert a.ids == b.ids and a.category == b.category and a.steered == b.steered
        assert a.coef == b.coef
        below += sum(c == -1 for c in a.category)
        assert all(c == 0.0 for c, s in zip(a.coef, a.steered) if not s)
    assert below > 0, "the threshold must fail somewhere"
    assert any(any(r.steered) for r in out.results)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_routed_mode_matches_naive_hooks(family):
    base, think = pair(family)
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=1, steer_layer=2, coefficients=[0.5, 1.0, 0.0, 2.0, 1.5], threshold=0.5)
    out = HybridModel(base, think, sae, vec, mode="routed", **kw).generate(
        BASE_PROMPTS, THINK_PROMPTS, T, eos_token_id=2)
    ref = routed_generate_hooks(base, think, sae, vec, sae_layer=1, steer_layer=2,
                                base_prompts=BASE_PROMPTS, thinking_prompts=THINK_PROMPTS,
                                coefficients=kw["coefficients"], threshold=0.5,
                                max_new_tokens=T, eos_token_id=2)
    plain = Engine(base).generate(BASE_PROMPTS, T, eos_token_id=2).sequences()
    cats = []
    for a, (ids, c) in zip(out.results, ref):
        assert a.ids == ids and a.category == c
        cats += a.category
    assert -1 in cats and any(c >= 0 for c in cats), "threshold must both pass and fail"
    assert [r.ids for r in out.results] != plain


def test_windows_use_recompute_and_differ():
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=2, steer_layer=1, coefficients=[2.0, 4.0])
    w1 = HybridModel(base, think, sae, vec, **kw).generate(BASE_PROMPTS, THINK_PROMPTS, 12)
    w0 = HybridModel(base, think, sae, vec, windows=(0,), **kw).generate(
        BASE_PROMPTS, THINK_PROMPTS, 12)
    # the first token sees one steered position either way; later ones differ (all positions)
    assert [r.ids[0] for r in w0.results] == [r.ids[0] for r in w1.results]
    assert [r.ids for r in w0.results] != [r.ids for r in w1.results]


def test_bad_input_errors():
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    with pytest.raises(ValueError, match="SAE input size 32 does not match.*64"):
        HybridModel(base, think, router_and_vectors(32, 64)[0], vec, sae_layer=1, steer_layer=1)
    with pytest.raises(ValueError, match="steering vectors have width 48.*64"):
        HybridModel(base, think, sae, router_and_vectors(64, 48)[1], sae_layer=1, steer_layer=1)
    with pytest.raises(ValueError, match="sae_layer=9 out of range.*0..3"):
        HybridModel(base, think, sae, vec, sae_layer=9, steer_layer=1)
    with pytest.raises(ValueError, match="steer_layer=-1 out of range"):
        HybridModel(base, think, sae, vec, sae_layer=1, steer_layer=-1)
    from hybridfast.tiny import tiny_model
    with pytest.raises(ValueError, match="vocabulary"):
        HybridModel(base, tiny_model("qwen2", vocab_size=80), sae, vec, sae_layer=1, steer_layer=1)
    hm = HybridModel(base, think, sae, vec, sae_layer=1, steer_layer=1)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        hm.generate([[]], [[1]], 4)
    bad = dict(sae, W_enc=sae["W_enc"].clone())
    with torch.no_grad():
        for p in think.model.layers[0].parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        HybridModel(base, think, bad, vec, sae_layer=1, steer_layer=1,
                    mode="routed").generate([[1, 2]], [[1]], 3)


def test_paper_mode_refuses_what_it_would_ignore():
    """Paper mode is greedy and always steers: a temperature (also on the recompute path of
    windows) or steer=False must raise, not return greedy / steered tokens."""
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    kw = dict(sae_layer=2, steer_layer=1, coefficients=[0.5, 2.0])
    for windows in [(1,), (0,)]:
        hm = HybridModel(base, think, sae, vec, windows=windows, **kw)
        with pytest.raises(ValueError, match="greedy"):
            hm.generate(BASE_PROMPTS, THINK_PROMPTS, 4, temperature=0.7)
        with pytest.raises(ValueError, match="steer=False"):
            hm.generate(BASE_PROMPTS, THINK_PROMPTS, 4, steer=False)
    with pytest.raises(ValueError, match="steer=False"):
        next(HybridModel(base, think, sae, vec, **kw).stream(BASE_PROMPTS, THINK_PROMPTS, 4, steer=False))


def test_vocabulary_sizes_checked_unless_both_tokenizers_compared():
    from hybridfast.tiny import tiny_model
    base, _ = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)

    class Tok:
        def get_vocab(self):
            return {"a": 0}
    with pytest.raises(ValueError, match="vocabulary"):
        HybridModel(base, tiny_model("qwen2", vocab_size=80), sae, vec, sae_layer=1, steer_layer=1,
                    base_tokenizer=Tok())


def test_tokenizer_mismatch_named():
    from hybridfast.hybrid import _check_tokenizers

    class Tok:
        def __init__(self, v, added=None):
            self.v, self.added = v, added or {}

        def get_vocab(self):
            return {**self.v, **self.added}

        def get_added_vocab(self):
            return self.added
    _check_tokenizers(Tok({"a": 0}), Tok({"a": 0}))
    with pytest.raises(ValueError, match=r"tokenizers differ.*only in base \['b'\]"):
        _check_tokenizers(Tok({"a": 0, "b": 1}), Tok({"a": 0}))
    # a distilled thinking model renames its special tokens (DeepSeek-R1-Distill vs Qwen2.5): allowed
    _check_tokenizers(Tok({"a": 0}, {"<|endoftext|>": 1, "<|im_start|>": 2}),
                      Tok({"a": 0}, {"<｜end▁of▁sentence｜>": 1, "<think>": 3}))
