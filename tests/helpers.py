"""Shared fixtures-as-functions for the engine tests (tiny random models, SAE, vectors, a model
whose power distribution can be enumerated)."""
import itertools

import torch

from hybridfast.baselines import steering_hook
from hybridfast.tiny import tiny_model


def perturbed_copy(model, scale: float, seed: int):
    """A 'thinking' model: the base with every weight perturbed (agrees with it often, not always)."""
    import copy
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return m


def pair(family: str, seed: int = 1, scale: float = 0.3):
    base = tiny_model(family, seed=seed)
    return base, perturbed_copy(base, scale, seed + 100)


def router_and_vectors(d_think: int, d_base: int, K: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sae = dict(W_enc=torch.randn(d_think, K, generator=g), b_enc=torch.randn(K, generator=g) * 0.1,
               b_dec=torch.randn(d_think, generator=g) * 0.1)
    vec = (torch.randn(K, d_base, generator=g) * 3, torch.randn(d_base, generator=g))
    return sae, vec


BASE_PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
THINK_PROMPTS = [[3, 4, 5], [20, 21, 22, 23, 24, 25], [30, 31]]


def error_line(text: str) -> str:
    """The one line a refused command prints (and nothing else)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridfast: error: "), text
    return lines[0]


def refused(argv, capsys, entry=None) -> str:
    """Run a CLI entry (default ``hybridfast eval``) in this process; it must exit 2 with one
    error line, which is returned."""
    import pytest
    from hybridfast.eval import main
    with pytest.raises(SystemExit) as e:
        (entry or main)(argv)
    assert e.value.code == 2
    return error_line(capsys.readouterr().err)


def forbid_model_loading(monkeypatch):
    """From now on, loading a model in ``hybridfast eval`` fails the test."""
    import pytest
    import hybridfast.eval as ev
    monkeypatch.setattr(ev, "_models", lambda *a, **k: pytest.fail("a model was loaded"))


# A 4-token vocabulary model whose answers (at most T tokens after ENUM_PROMPT) can be enumerated.
ENUM_EOS = 3
ENUM_PROMPT = [0, 1]


def enum_model():
    return tiny_model("qwen2", seed=5, vocab_size=4, bos_token_id=0, eos_token_id=ENUM_EOS,
                      pad_token_id=0, initializer_range=0.1)


def complete_sequences(T: int, vocab: int = 4):
    """Every complete generation: ends with EOS, or reaches T tokens."""
    out = []
    for n in range(1, T + 1):
        for s in itertools.product(range(vocab), repeat=n):
            if ENUM_EOS in s[:-1]:
                continue
            if n < T and s[-1] != ENUM_EOS:
                continue
            out.append(s)
    return out


@torch.no_grad()
def exact_power(model, alpha: float, T: int):
    """Every complete generation of at most ``T`` tokens after ``ENUM_PROMPT`` and its probability
    under p^alpha."""
    seqs = complete_sequences(T)
    logp = []
    for s in seqs:
        ids = torch.tensor([ENUM_PROMPT + list(s)])
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        logp.append(sum(float(lp[len(ENUM_PROMPT) - 1 + i, t]) for i, t in enumerate(s)))
    w = torch.tensor(logp, dtype=torch.float64) * alpha
    return seqs, torch.softmax(w, 0)


def chi2_pvalue(samples, seqs, probs):
    """Chi-square p-value of the sample frequencies against ``probs`` over ``seqs`` (cells expecting
    fewer than 5 samples pooled), and the frequencies."""
    from scipy.stats import chisquare
    index = {s: i for i, s in enumerate(seqs)}
    counts = torch.zeros(len(seqs), dtype=torch.float64)
    for s in samples:
        counts[index[tuple(s)]] += 1
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs, ex = counts[big], exp[big]
    if not big.all():
        obs, ex = torch.cat([obs, counts[~big].sum()[None]]), torch.cat([ex, exp[~big].sum()[None]])
    return chisquare(obs.numpy(), ex.numpy()).pvalue, counts / n


def steering_artifacts(folder, *, sae_layer=3, steer_layer=2, K=3, vectors_K=None, threshold=None,
               sae_model="tiny-thinking", vectors_model="tiny-base", d=64):
    """An SAE and a vectors folder for the tiny pair (hidden size 64, 4 blocks)."""
    from hybridfast.artifacts import SAEParams, SteeringVectors
    from hybridfast.io import save_sae, save_vectors
    g = torch.Generator().manual_seed(0)
    sae = SAEParams(torch.randn(d, K, generator=g), torch.zeros(K), torch.zeros(d))
    vec = SteeringVectors(torch.randn(vectors_K or K, d, generator=g), torch.randn(d, generator=g))
    save_sae(folder / "sae", sae, layer=sae_layer, model_id=sae_model)
    save_vectors(folder / "vec", vec, steer_layer=steer_layer, model_id=vectors_model, threshold=threshold)
    return str(folder / "sae"), str(folder / "vec")


@torch.no_grad()
def teacher_forced_logp(model, prompt, ids):
    """log p of ``ids`` after ``prompt`` under a ``transformers`` model (its own forward, one
    pass over the whole sequence)."""
    n, P = len(ids), len(prompt)
    logits = model(torch.tensor([list(prompt) + list(ids)])).logits[0, P - 1: P - 1 + n]
    return torch.log_softmax(logits.float(), -1)[torch.arange(n), torch.tensor(ids, dtype=torch.long)]


@torch.no_grad()
def routed_logp(hm, prompt, tprompt, ids):
    """log p of ``ids`` after ``prompt`` under the routed model, teacher-forced: the thinking
    model's residual after block ``sae_layer`` at thinking position ``len(tprompt) - 1 + i`` routes
    the base residual entering ``steer_layer`` at the position that predicts token ``i``."""
    n, P, Pt = len(ids), len(prompt), len(tprompt)
    out = hm.thinking.hf(torch.tensor([tprompt + ids]), output_hidden_states=True)
    x = out.hidden_states[hm.sae_layer + 1][0, Pt - 1: Pt - 1 + n]

    def steer(h):
        h = h.clone()
        h[0, P - 1: P - 1 + n] = hm.route(h[0, P - 1: P - 1 + n], x)[0]
        return h
    with steering_hook(hm.base.hf, hm.steer_layer, steer):
        logits = hm.base.hf(torch.tensor([prompt + ids])).logits[0, P - 1: P - 1 + n]
    return torch.log_softmax(logits.float(), -1)[torch.arange(n), ids]
