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

from .helpers import (ENUM_EOS, ENUM_PROMPT, enum_model, pair, routed_logp, router_and_vectors,
                      teacher_forced_logp)

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batched ops: one intra-op thread (two spin against each other on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="module")
def steered():
    """``steered(reuse)``: an MH sampler of the tiny base model steered by a routed HybridModel."""
    from hybridfast import HybridModel
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    hm = HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1, mode="routed",
                     coefficients=2.0, threshold=-1e9)
    return lambda reuse=True: PowerSampler(base, steer=hm, reuse=reuse, alpha=4, block_size=4, n_mcmc=3,
                                           max_new_tokens=12, eos_token_id=-1)


STEER_PROMPTS, STEER_THINK = [[5, 6, 7], [8, 9, 10, 11]], [[3, 4], [20, 21, 22]]


def test_static_steered_mh_reproduces_the_pre_refactor_chains(steered):
    ps = steered()
    out = ps.sample(STEER_PROMPTS, thinking_prompts=STEER_THINK, n_chains=2, generator=_gen(9))
    assert [r.ids for r in out] == FROZEN_STEER_MH
    assert (ps.last_stats["decoded_tokens"], ps.last_stats["token_forwards"]) == (192, 202)


# ------------------------------------------------------------------------------ rows= (continuous)

def _varied(enum, rows, **kw):
    """A workload of varied lengths: chains end at EOS after 1..6 tokens (blocks of 2)."""
    ps = PowerSampler(enum, **ENUM, **kw)
    out = ps.sample(ENUM_PROMPTS * 3, n_chains=4, rows=rows, generator=_gen(21))
    return out, ps.last_stats


def _check_chains(out, prompts, n_mcmc, logp):
    """Every chain's own MH steps (n_mcmc per block it reached) and, token by token, the log p
    it recorded equal to a teacher-forced recomputation (the KV its rows reused was exact)."""
    for r in out:
        assert r.stats["proposals"] % n_mcmc == 0 and r.stats["proposals"] > 0
        assert len(r.stats["accepted"]) == r.stats["proposals"]
        assert len(r.ids) == len(r.logp) == len(r.logq)
        assert r.logp == pytest.approx(logp(prompts[r.prompt_index], r.ids).tolist(), abs=1e-4)


def test_async_rows_hold_exact_kv(enum, tiny):
    """Rows at different phases (extensions, MH steps from different m) decode together, settle
    one by one and are refilled while others are mid-way: each chain's log p equals the
    transformers forward of its final tokens, and the counts add up."""
    out, st = _varied(enum, rows=5)
    assert [r.prompt_index for r in out] == [i for i in range(6) for _ in range(4)]   # prompt order
    assert len({len(r.ids) for r in out}) >= 3                 # varied lengths: rows freed at different times
    prompts = ENUM_PROMPTS * 3
    _check_chains(out, prompts, ENUM["n_mcmc"], lambda p, ids: teacher_forced_logp(enum, p, ids))
    assert all(r.ids[-1] == ENUM_EOS or len(r.ids) == 6 for r in out)
    # one token-forward per decoded token plus each prompt's prefill (its last position gives
    # the first token), refills included
    P = sum(len(prompts[i]) - 1 for i in range(6) for _ in range(4))
    assert st["token_forwards"] == P + st["decoded_tokens"] and st["rows"] == 5
    ps = PowerSampler(tiny, **TINY)       # no EOS: every chain 15 tokens, 3 blocks, phases of every length
    long = ps.sample(TINY_PROMPTS, n_chains=3, rows=4, generator=_gen(5))
    assert [len(r.ids) for r in long] == [15] * 6
    _check_chains(long, TINY_PROMPTS, TINY["n_mcmc"], lambda p, ids: teacher_forced_logp(tiny, p, ids))
    assert all(len(r.stats["accepted"]) == 3 * TINY["n_mcmc"] for r in long)


def test_early_eos_chains_free_their_rows(enum):
    _, static = _varied(enum, rows=None)
    _, cont = _varied(enum, rows=6)
    assert static["rows"] == 24 and cont["rows"] == 6
    # lockstep rounds idle most row-steps; asynchronous rows idle only after an early EOS until
    # the next sync point and in the tail, when no chain is left to admit
    assert static["idle_row_steps"] > 0.4 * static["row_steps"], static
    assert cont["idle_row_steps"] < 0.2 * cont["row_steps"], cont
    assert cont["row_steps"] < static["row_steps"]


def test_same_schedule_same_chains(enum):
    a = [r.ids for r in _varied(enum, rows=5)[0]]
    assert [r.ids for r in _varied(enum, rows=5)[0]] == a
    ps = PowerSampler(enum, **ENUM)
    streamed = [r for group in ps.stream(ENUM_PROMPTS * 3, n_chains=4, rows=5, generator=_gen(21))
                for r in group]
    assert sorted(map(tuple, (r.ids for r in streamed))) == sorted(map(tuple, a))
    assert len(streamed) == 24 and ps.last_stats["chains"] == 24


class NoHastings(PowerSampler):
    """A broken MH: the acceptance forgets the Hastings term of the length change."""

    def _log_accept(self, cur, prop, mi):
        L, Lp = cur.lengths.clamp_min(1).float(), prop.lengths.clamp_min(1).float()
        return super()._log_accept(cur, prop, mi) - (torch.log(L) - torch.log(Lp))


def test_mh_with_refills_samples_p_alpha(enum):
    """3000 chains through 1200 rows (the last wave fills rows partly, beside idle ones): the
    samples match p^alpha by enumeration (fixed seed; exact MH must not be rejected at 1e-3), and
    the same schedule without the Hastings term is rejected (at 1e-6; 1000 chains, 400 rows)."""
    from .helpers import chi2_pvalue, exact_power
    T, alpha = 3, 2.0
    seqs, probs = exact_power(enum, alpha, T)
    kw = dict(alpha=alpha, block_size=T, max_new_tokens=T, n_mcmc=60, eos_token_id=ENUM_EOS)
    ps = PowerSampler(enum, **kw)
    out = ps.sample([ENUM_PROMPT], n_chains=3000, rows=1200, generator=_gen(11))
    assert ps.last_stats["rows"] == 1200
    p, _ = chi2_pvalue([r.ids for r in out], seqs, probs)
    assert p > 1e-3, f"MH with refills rejected: p={p}"
    broken = NoHastings(enum, **kw).sample([ENUM_PROMPT], n_chains=1000, rows=400, generator=_gen(11))
    p0, _ = chi2_pvalue([r.ids for r in broken], seqs, probs)
    assert p0 < 1e-6, f"MH without the Hastings term not rejected: p={p0}"


def test_steered_mh_with_rows(steered):
    """4 chains through 3 rows: the 4th is prefilled (base and thinking caches) into a freed row;
    every chain's log p equals the routed model's teacher-forced one."""
    ps = steered()
    out = ps.sample(STEER_PROMPTS, thinking_prompts=STEER_THINK, n_chains=2, rows=3, generator=_gen(9))
    assert [len(r.ids) for r in out] == [12] * 4 and ps.last_stats["rows"] == 3
    assert [r.prompt_index for r in out] == [0, 0, 1, 1]
    hm = ps.steer
    _check_chains(out, STEER_PROMPTS, ps.n_mcmc,
                  lambda p, ids: routed_logp(hm, p, STEER_THINK[STEER_PROMPTS.index(p)], ids))


def test_rows_refused_where_unsupported(tiny):
    with pytest.raises(ValueError, match="rows must be >= 1"):
        PowerSampler(tiny, **TINY).sample([[5]], rows=0)
    with pytest.raises(NotImplementedError, match="method='mh' or 'smc'"):
        PowerSampler(tiny, **TINY, method="scalable").sample([[5]], rows=2)
    for kw in (dict(reuse=False), dict(reject="reprefill")):
        with pytest.raises(NotImplementedError, match="needs KV reuse"):
            PowerSampler(tiny, **TINY, **kw).sample([[5]], rows=2)


def test_eval_power_mh_keeps_batch_size_chains_live(tmp_path):
    from hybridfast.eval import ResultsLog, run_eval
    kw = dict(limit=5, max_new_tokens=6, n_mcmc=1, block_size=2, progress=False)
    run_eval("power-mh", out=tmp_path / "c", batch_size=2, **kw)
    rows = ResultsLog(tmp_path / "c" / "results.jsonl").rows()
    assert len(rows) == 5 and len({r["problem"] for r in rows}) == 5
    for r in rows:
        assert isinstance(r["output"], str) and r["tokens"] >= 1 and r["steered_tokens"] == 0
        assert r["mh_accepted"] and all(isinstance(a, bool) for a in r["mh_accepted"])
        assert r["run"]["method"] == "power-mh" and "rows" not in r["run"]["sample"]


def test_compiled_step_with_refills_matches_eager(enum):
    """Refilled rows reuse the one compiled decode step (static shapes: R rows, bucketed width)."""
    from torch._dynamo.testing import CompileCounter
    eager = [r.ids for r in _varied(enum, rows=5)[0]]
    cc = CompileCounter()
    assert [r.ids for r in _varied(enum, rows=5, compile={"backend": cc})[0]] == eager
    assert cc.frame_count == 1


@pytest.mark.parametrize("method", ["mh", "smc"])
def test_power_batching_benchmark_smoke(tmp_path, method):
    """bench/bench_power_batching.py --smoke runs both schedules and reports consistent counts
    (the tiny config has no EOS: SMC groups all run to the token limit, so only MH idles less)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "pb.json"
    r = subprocess.run([sys.executable, "bench/bench_power_batching.py", "--smoke", "--method", method,
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["schedule"]: x for x in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"static", "continuous"}
    for x in rows.values():
        assert x["problems"] == 6 and 0 <= x["idle_row_steps"] < x["row_steps"] and x["host_syncs"] > 0
        assert x["decoded_tokens"] <= x["token_forwards"]
    if method == "mh":
        assert rows["continuous"]["idle_row_steps"] < rows["static"]["idle_row_steps"]
    else:
        assert rows["continuous"]["decoded_tokens"] == rows["static"]["decoded_tokens"] == 6 * 8 * 8


# ------------------------------------------------------------------------------ SMC rows=

def test_smc_rows_at_least_the_groups_is_the_static_run(tiny):
    ps = PowerSampler(tiny, **TINY, method="smc", n_particles=4)
    out = ps.sample(TINY_PROMPTS, n_chains=2, rows=4, generator=_gen(5))
    assert [r.ids for r in out] == FROZEN_TINY_SMC and ps.last_stats["rows"] == 16


def test_smc_refilled_groups_are_exact(enum, tiny):
    """Groups of particles end at different times (EOS) and the next problem's particles are
    prefilled into their rows: every selected particle's log p equals the transformers forward of
    its tokens, prompts keep their order, and fewer row-steps idle than in the static batch."""
    kw = dict(method="smc", n_particles=4, alpha=2, max_new_tokens=6, eos_token_id=ENUM_EOS, sync_every=1)
    prompts = ENUM_PROMPTS * 4
    ps = PowerSampler(enum, **kw)
    out = ps.sample(prompts, rows=3, generator=_gen(2))
    cont = ps.last_stats
    assert [r.prompt_index for r in out] == list(range(8)) and cont["rows"] == 12
    for r in out:
        assert r.logp == pytest.approx(teacher_forced_logp(enum, prompts[r.prompt_index], r.ids).tolist(), abs=1e-4)
        assert len(r.stats["particle_ids"]) == 4 and sum(r.stats["weights"]) == pytest.approx(1.0)
    ps.sample(prompts, generator=_gen(2))
    static = ps.last_stats
    assert cont["idle_row_steps"] / cont["row_steps"] < static["idle_row_steps"] / static["row_steps"]
    long = PowerSampler(tiny, **{**TINY, "eos_token_id": 2}, method="smc", n_particles=3, ess_threshold=1.0)
    res = long.sample(TINY_PROMPTS * 2, rows=1, generator=_gen(8))
    assert long.last_stats["resampling_events"] > 0
    for r in res:
        ref = teacher_forced_logp(tiny, TINY_PROMPTS[r.prompt_index % 2], r.ids)
        assert r.logp == pytest.approx(ref.tolist(), abs=1e-4)


def test_smc_with_refills_targets_p_alpha(enum):
    """The particle measure of groups run through refilled rows is as close to p^alpha as the
    static batch's (enumeration; 60 groups of 256 particles through 7 slots)."""
    from .helpers import exact_power
    T, alpha = 3, 2.0
    seqs, probs = exact_power(enum, alpha, T)
    index = {s: i for i, s in enumerate(seqs)}
    ps = PowerSampler(enum, alpha=alpha, max_new_tokens=T, method="smc", n_particles=256, eos_token_id=ENUM_EOS)
    out = ps.sample([ENUM_PROMPT] * 60, rows=7, generator=_gen(2))
    acc = torch.zeros(len(seqs), dtype=torch.float64)
    for r in out:
        for w, part in zip(r.stats["weights"], r.stats["particle_ids"]):
            acc[index[tuple(part)]] += w
    tv = 0.5 * (acc / 60 - probs).abs().sum()
    assert tv < 0.05, tv


def test_smc_rows_refused_with_a_ramp(enum):
    with pytest.raises(NotImplementedError, match="alpha_ramp"):
        PowerSampler(enum, **ENUM, method="smc", n_particles=2, alpha_ramp=3).sample(ENUM_PROMPTS * 2, rows=1)


def test_smc_step_reads_the_device_once(tiny, monkeypatch):
    """One SMC token step costs one host sync (whether any group resamples): counted as the
    dispatched scalar reads of a run one token longer; resampling adds none per step (the reference
    sampler: the C++ one reads its seed, a CPU scalar, on the host)."""
    from hybridfast.opcount import count_ops
    monkeypatch.setenv("HYBRIDFAST_IMPL", "torch")

    def run(T, ess_threshold):
        ps = PowerSampler(tiny, alpha=4, max_new_tokens=T, eos_token_id=-1, method="smc", n_particles=3,
                          ess_threshold=ess_threshold)
        return count_ops(lambda: ps.sample([[5, 6, 7]], generator=_gen(1))), ps.last_stats
    (c8, s8), (c9, s9) = run(8, 1e-9), run(9, 1e-9)
    assert (c9 - c8).syncs == 1 and s9["host_syncs"] - s8["host_syncs"] == 1
    (r9, t9) = run(9, 1.0)
    assert s9["resampling_events"] == 0 and t9["resampling_events"] >= 2
    assert r9.syncs == c9.syncs + 1 and t9["host_syncs"] == s9["host_syncs"]   # + the count, read at the end
