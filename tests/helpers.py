"""Shared fixtures-as-functions for the engine tests (tiny random models, SAE, vectors)."""
import torch

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
