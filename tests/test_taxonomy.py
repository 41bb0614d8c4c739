"""Taxonomy discovery and steering vectors: sentence splitting, the planted-mechanism proof,
artifacts, resumable training."""
import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridfast.activations import sentence_activations
from hybridfast.artifacts import SAEParams, SteeringVectors
from hybridfast.baselines import steering_hook
from hybridfast.io import load_sae, load_vectors, save_sae, save_tensors, save_vectors
from hybridfast.sae import preprocess, taxonomy_metrics, train_topk_sae
from hybridfast.sentences import extract_thinking, split_sentences
from hybridfast.steering import VectorExample, train_vectors
from hybridfast.tiny import tiny_model, tiny_tokenizer

# ----------------------------------------------------------------------------- sentences

words = st.text(alphabet="abcdefghij", min_size=1, max_size=6)
pieces = st.one_of(words, st.sampled_from([". ", "! ", "? ", "; ", "\n", " ", "3.14", "E. coli",
                                           "5! ", "...", "!!", "\n\n", "k!/2", " 0.5 "]))


@settings(max_examples=200, deadline=None)
@given(st.lists(pieces, max_size=40).map(" ".join))
def test_split_sentences_properties(text):
    out = split_sentences(text)
    last = 0
    for s, a, e in out:
        assert text[a:e] == s                     # spans index the original text
        assert len(s.split()) >= 3                # never under three words
        assert s == s.strip() and a >= last       # stripped, in order, disjoint
        last = e
        for i in range(a, e - 1):                 # no boundary inside, except protected ones
            if text[i] == "\n":
                raise AssertionError(f"newline inside {s!r}")


@given(st.integers(0, 999), st.integers(0, 999))
def test_decimals_never_split(a, b):
    text = f"The value is {a}.{b} units today. Then we add more things."
    out = [s for s, _, _ in split_sentences(text)]
    assert out[0] == f"The value is {a}.{b} units today."


def test_split_rules():
    t = "We use E. coli here now. So 5! equals 120 exactly!!! Next; fine we go on\nnew line is here"
    assert [s for s, _, _ in split_sentences(t)] == [
        "We use E. coli here now.", "So 5! equals 120 exactly!!!", "fine we go on", "new line is here"]
    assert extract_thinking("<think>a b c</think> answer") == "a b c"
    assert extract_thinking("no tags here") == "no tags here"


@pytest.mark.parametrize("layer", [1, 3])
def test_sentence_activation_is_what_the_router_reads(layer):
    """The mean, over the sentence's token span, of the residual output by block ``layer`` as the
    engine's router captures it; at the last block too (Hugging Face's last hidden state there
    has the final norm applied)."""
    from hybridfast.engine import Engine, pad_prompts
    tok = tiny_tokenizer()
    m = tiny_model("qwen2", seed=3, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert m.config.num_hidden_layers == 4
    text = "We add the two numbers first. Then we check the sum again. Done with it now."
    X, recs = sentence_activations(m, tok, [""], [text], layer=layer)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    e = Engine(m)

    def router_reads(j):              # the residual output by block `layer` at position j
        cache = e.new_cache(1, j + 1)
        pid, lengths = pad_prompts([ids[: j + 1]], 0, m.device)
        return e.prefill(pid, lengths, cache, capture_layer=layer)[1][0].float()
    assert len(recs) == 3
    for x, r in zip(X, recs):
        ref = torch.stack([router_reads(j) for j in range(r.tok_lo, r.tok_hi + 1)]).mean(0)
        torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- planted mechanism

K, LP, NORM = 3, 2, 10.0


@pytest.fixture(scope="module")
def planted():
    """A 'thinking' model = the base plus a known vector per category, added entering block LP
    when a token of that category's (exclusive) word list is read."""
    tok = tiny_tokenizer()
    base = tiny_model("qwen2", seed=3, vocab_size=len(tok), bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, initializer_range=0.1)
    cands = [w[1:] for w in (tok.decode([t]) for t in range(len(tok)))
             if w.startswith(" ") and w[1:].isalpha() and len(w) >= 4
             and len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    groups = [cands[i::K][:10] for i in range(K)]
    assert all(len(g) >= 3 for g in groups)
    cat_of = torch.full((len(tok),), -1)
    for c, g in enumerate(groups):
        for w in g:
            cat_of[tok(" " + w, add_special_tokens=False)["input_ids"][0]] = c
    U = torch.randn(K, 64, generator=torch.Generator().manual_seed(0))
    U = U / U.norm(dim=1, keepdim=True) * NORM
    think = copy.deepcopy(base)
    state = {}
    think.model.register_forward_pre_hook(
        lambda mod, args, kw: state.__setitem__("ids", kw.get("input_ids", args[0] if args else None)),
        with_kwargs=True)

    def plant(mod, args, kw):
        c = cat_of[state["ids"]]
        add = torch.where((c >= 0)[..., None], U[c.clamp_min(0)], torch.zeros(()))
        return (args[0] + add,) + tuple(args[1:]), kw
    think.model.layers[LP].register_forward_pre_hook(plant, with_kwargs=True)
    rng = random.Random(0)

    def sentence(c):
        return " ".join(rng.choice(groups[c]) for _ in range(rng.randint(6, 9))) + "."
    return dict(tok=tok, base=base, think=think, U=U, sentence=sentence, rng=rng)


def test_sae_recovers_planted_categories(planted):
    rng, sentence = planted["rng"], planted["sentence"]
    traces, labels = [], []
    for _ in range(120):
        cs = [rng.randrange(K) for _ in range(6)]
        traces.append(" ".join(sentence(c) for c in cs))
        labels.append(cs)
    X, recs = sentence_activations(planted["think"], planted["tok"], [""] * len(traces), traces,
                                   layer=LP, batch_size=16)
    y = torch.tensor([labels[r.trace][r.index] for r in recs])
    assert len(recs) == 6 * len(traces)
    tr = torch.tensor([r.trace for r in recs])
    train = tr < 96                                         # held-out traces: the last 24
    Xp, mean = preprocess(X[train], tr[train])
    Xh, _ = preprocess(X[~train], mean=mean)
    res = train_topk_sae(Xp, n_latents=6, k=3, seed=1, batch_size=64)
    ct, ch = res.sae.categorize(Xp), res.sae.categorize(Xh)
    majority = {j: int(torch.mode(y[train][ct == j]).values) for j in ct.unique().tolist()}
    pred = torch.tensor([majority.get(j, -1) for j in ch.tolist()])
    purity = float((pred == y[~train]).float().mean())
    assert purity >= 0.9, purity
    # without the planted mechanism the same pipeline finds no such structure
    X0, _ = sentence_activations(planted["base"], planted["tok"], [""] * 40, traces[:40], layer=LP)
    m = taxonomy_metrics(res.sae, Xp)
    assert 0 <= m["fvu"] < 1 and sum(m["counts"]) == Xp.shape[0]
    assert not torch.allclose(X0, X[: X0.shape[0]])


def test_vectors_recover_planted_directions(planted):
    base, tok, U, rng, sentence = (planted[k] for k in ("base", "tok", "U", "rng", "sentence"))
    exs = []
    for c in range(K):
        def add(h, u=U[c]):
            h = h.clone()
            h[:, -1] += u
            return h
        prompts = [tok(sentence(rng.randrange(K)), add_special_tokens=False)["input_ids"][:6]
                   for _ in range(320)]
        # data from the planted mechanism, sampled at temperature 1/coldness
        with steering_hook(base, LP, add), torch.no_grad():
            torch.manual_seed(1000 * c)
            out = base.generate(torch.tensor(prompts), max_new_tokens=12, do_sample=True,
                                temperature=1 / 0.7, top_k=0, top_p=1.0, eos_token_id=None,
                                pad_token_id=0)
        exs += [VectorExample(p, o[6:].tolist(), c) for p, o in zip(prompts, out)]
    res = train_vectors(base, exs, K, LP, epochs=50, batch_size=16, lr=0.05, seed=0)
    cos = torch.nn.functional.cosine_similarity(res.V, U, dim=1)
    assert (cos >= 0.9).all(), cos.tolist()
    assert all(p.grad is None for p in base.parameters())


# ----------------------------------------------------------------------------- artifacts & resume

def test_artifacts_roundtrip_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    sae = SAEParams(torch.randn(8, 4, generator=g), torch.randn(4, generator=g), torch.randn(8, generator=g),
                    torch.randn(8, generator=g), True, torch.randn(4, 8, generator=g))
    save_sae(tmp_path / "sae", sae, layer=2, model_id="tiny", taxonomy={"categories": []})
    back = load_sae(tmp_path / "sae")
    assert torch.equal(back.W_enc, sae.W_enc) and back.normalize and torch.equal(back.x_mean, sae.x_mean)
    vec = SteeringVectors(torch.randn(4, 6, generator=g), torch.randn(6, generator=g), ["a", "b", "c", "d"])
    save_vectors(tmp_path / "vec", vec, steer_layer=1)
    v2 = load_vectors(tmp_path / "vec")
    assert torch.equal(v2.V, vec.V) and v2.names == vec.names and v2.index("c") == 2
    with pytest.raises(KeyError, match="unknown category 'zzz'"):
        v2.index("zzz")
    (tmp_path / "vec" / "vectors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_vectors(tmp_path / "vec")
    save_tensors(tmp_path / "sae" / "sae.safetensors", dict(W_enc=torch.randn(8, 5), b_enc=torch.randn(4),
                                                              b_dec=torch.randn(8)))
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 5\), config says \(8, 4\)"):
        load_sae(tmp_path / "sae")
    # interop: SAELens and sparsify folders, the paper's .pt dicts
    (tmp_path / "lens").mkdir()
    save_tensors(tmp_path / "lens" / "sae_weights.safetensors",
                 dict(W_enc=sae.W_enc, b_enc=sae.b_enc, b_dec=sae.b_dec, W_dec=sae.W_dec))
    (tmp_path / "lens" / "cfg.json").write_text('{"normalize_activations": "none", "hook_layer": 3}')
    assert torch.equal(load_sae(tmp_path / "lens").W_enc, sae.W_enc)
    (tmp_path / "sp").mkdir()
    save_tensors(tmp_path / "sp" / "sae.safetensors", {"encoder.weight": sae.W_enc.T.contiguous(),
                                                       "encoder.bias": sae.b_enc, "b_dec": sae.b_dec})
    assert torch.equal(load_sae(tmp_path / "sp").W_enc, sae.W_enc)
    torch.save({"deduction": torch.randn(6), "bias": torch.randn(6)}, tmp_path / "v.pt")
    pv = load_vectors(tmp_path / "v.pt")
    assert pv.names == ["deduction"] and pv.bias is not None


def test_vector_training_resumes_exactly(tmp_path):
    m = tiny_model("qwen2", seed=1)
    g = torch.Generator().manual_seed(0)
    exs = [VectorExample(torch.randint(3, 96, (5,), generator=g).tolist(),
                         torch.randint(3, 96, (4,), generator=g).tolist(), i % 2) for i in range(12)]
    kw = dict(epochs=6, batch_size=4, seed=3, patience=100)
    full = train_vectors(m, exs, 2, 1, **kw)
    part = train_vectors(m, exs, 2, 1, checkpoint_dir=tmp_path, max_epochs_this_call=2, **kw)
    assert part.epochs == 2
    rest = train_vectors(m, exs, 2, 1, checkpoint_dir=tmp_path, **kw)   # "crash" and resume
    assert rest.epochs == 6 and rest.steps == full.steps
    assert torch.allclose(rest.V, full.V, atol=1e-6)
    with pytest.raises(ValueError, match="unknown category 5"):
        train_vectors(m, [VectorExample([1], [2], 5)], 2, 1)
