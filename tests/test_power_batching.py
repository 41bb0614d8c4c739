"""Typed chain state and continuous batching of MH chains (PowerSampler(rows=...)).

The frozen expectations below were recorded from the implementation before the chain-state
refactor (commit 219ccaf, hybridfast/power.py with dict state), on this repository's tiny models,
by running the same calls and printing ``[r.ids for r in out]`` and ``last_stats``; the refactored
code reproduced every call bit for bit (ids, logp, logq, per-chain and total stats, MH trace), for
MH with reuse keep / reprefill, recompute, official=True, top_k, steer=, and SMC with and without
alpha_ramp. The default (rows=None) must keep reproducing them.
"""
import pytest
import torch

from hybridfast.power import PowerSampler
from hybridfast.tiny import tiny_model

from .helpers import ENUM_EOS, ENUM_PROMPT, enum_model, pair, router_and_vectors

TINY = dict(alpha=4, block_size=5, n_mcmc=3, max_new_tokens=15, eos_token_id=-1)
TINY_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
ENUM = dict(alpha=2, block_size=2, n_mcmc=3, max_new_tokens=6, eos_token_id=ENUM_EOS)
ENUM_PROMPTS = [ENUM_PROMPT, [0, 2, 1]]

FROZEN_TINY_MH = [[30, 60, 50, 81, 2, 29, 60, 54, 31, 44, 36, 75, 72, 77, 68],
                  [30, 60, 50, 81, 2, 29, 60, 54, 31, 44, 44, 36, 55, 88, 72],
                  [67, 64, 31, 44, 0, 5, 89, 89, 75, 75, 52, 60, 88, 76, 2],
                  [8, 1, 2, 55, 2, 5, 50, 55, 64, 8, 3, 2, 22, 50, 95]]
FROZEN_ENUM_MH = [[2, 3], [2, 3], [0, 1, 1, 2, 0, 1], [2, 2, 1, 2, 1, 0], [3], [0, 1, 1, 1, 1, 1],
                  [3], [3], [3], [3], [3], [2, 3]]
FROZEN_ENUM_ACCEPTANCE = [1.0, 7 / 9, 7 / 9, 1.0, 0.0, 7 / 9, 2 / 3, 1 / 3, 2 / 3, 1.0, 0.0, 1.0]
FROZEN_STEER_MH = [[57, 20, 46, 62, 2, 58, 66, 0, 81, 43, 58, 29],
                   [57, 20, 46, 62, 2, 32, 31, 38, 14, 16, 88, 66],
                   [43, 81, 55, 89, 7, 89, 38, 43, 41, 15, 29, 33],
                   [43, 81, 67, 33, 32, 38, 29, 32, 12, 60, 64, 89]]
FROZEN_TINY_SMC = [[25, 36, 59, 1, 15, 65, 15, 72, 12, 55, 65, 29, 28, 81, 88],
                   [30, 60, 50, 81, 2, 29, 60, 54, 31, 44, 36, 75, 72, 77, 68],
                   [67, 3, 62, 81, 31, 16, 88, 88, 88, 46, 77, 85, 26, 29, 75],
                   [67, 3, 62, 81, 31, 16, 88, 88, 88, 46, 77, 3, 55, 60, 14]]
FROZEN_ENUM_SMC_RAMP = [[3], [2, 3], [2, 3], [3], [2, 3], [3]]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2", seed=1)


@pytest.fixture(scope="module")
def enum():
    return enum_model()


def _mh_fields_from_trace(stats, chain, result):
    """The per-chain MH flags as the trace of a static run gives them (a chain takes part in the
    first ``proposals`` steps)."""
    return [bool(acc[chain]) for *_, acc in stats["trace"][: result.stats["proposals"]]]


def test_static_mh_reproduces_the_pre_refactor_chains(tiny, enum):
    ps = PowerSampler(tiny, **TINY)
    out = ps.sample(TINY_PROMPTS, n_chains=2, generator=_gen(4))
    assert [r.ids for r in out] == FROZEN_TINY_MH
    assert (ps.last_stats["decoded_tokens"], ps.last_stats["token_forwards"]) == (271, 283)
    for kw in (dict(reuse=False), dict(reject="reprefill")):   # invariants: same chains
        assert [r.ids for r in PowerSampler(tiny, **TINY, **kw).sample(
            TINY_PROMPTS, n_chains=2, generator=_gen(4))] == FROZEN_TINY_MH
    ps = PowerSampler(enum, **ENUM)
    out = ps.sample(ENUM_PROMPTS, n_chains=6, generator=_gen(3))
    assert [r.ids for r in out] == FROZEN_ENUM_MH
    assert [r.stats["acceptance_rate"] for r in out] == pytest.approx(FROZEN_ENUM_ACCEPTANCE)
    assert (ps.last_stats["decoded_tokens"], ps.last_stats["token_forwards"]) == (172, 190)
    assert [r.prompt_index for r in out] == [0] * 6 + [1] * 6
    # per-chain MH flags equal what the static trace says
    assert all(r.stats["accepted"] == _mh_fields_from_trace(ps.last_stats, b, r) for b, r in enumerate(out))
    rec = PowerSampler(enum, **ENUM, reuse=False).sample(ENUM_PROMPTS, n_chains=6, generator=_gen(3))
    assert [r.ids for r in rec] == FROZEN_ENUM_MH      # recompute: same chains (log-probs up to rounding)
    assert [r.ids for r in PowerSampler(enum, **ENUM, official=True).sample(
        ENUM_PROMPTS, n_chains=6, generator=_gen(3))] == FROZEN_ENUM_MH


def test_static_smc_reproduces_the_pre_refactor_particles(tiny, enum):
    ps = PowerSampler(tiny, **TINY, method="smc", n_particles=4)
    out = ps.sample(TINY_PROMPTS, n_chains=2, generator=_gen(5))
    assert [r.ids for r in out] == FROZEN_TINY_SMC
    assert (ps.last_stats["token_forwards"], ps.last_stats["resampling_events"]) == (288, 9)
    ps = PowerSampler(enum, **ENUM, method="smc", n_particles=8, alpha_ramp=4)
    out = ps.sample(ENUM_PROMPTS, n_chains=3, generator=_gen(6))
    assert [r.ids for r in out] == FROZEN_ENUM_SMC_RAMP
    assert (ps.last_stats["decoded_tokens"], ps.last_stats["resampling_events"]) == (92, 4)


def _steered(reuse=True):
    from hybridfast import HybridModel
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    hm = HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1, mode="routed",
                     coefficients=2.0, threshold=-1e9)
    return PowerSampler(base, steer=hm, reuse=reuse, alpha=4, block_size=4, n_mcmc=3, max_new_tokens=12,
                        eos_token_id=-1)


STEER_PROMPTS, STEER_THINK = [[5, 6, 7], [8, 9, 10, 11]], [[3, 4], [20, 21, 22]]


def test_static_steered_mh_reproduces_the_pre_refactor_chains():
    ps = _steered()
    out = ps.sample(STEER_PROMPTS, thinking_prompts=STEER_THINK, n_chains=2, generator=_gen(9))
    assert [r.ids for r in out] == FROZEN_STEER_MH
    assert (ps.last_stats["decoded_tokens"], ps.last_stats["token_forwards"]) == (192, 202)
