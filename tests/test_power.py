"""Power sampling: exactness against p^alpha by enumeration, reuse == recompute, counts."""
import pytest
import torch

from hybridfast.power import PowerSampler, expected_mh_token_forwards
from hybridfast.tiny import tiny_model

from .helpers import (ENUM_EOS as EOS, ENUM_PROMPT as PROMPT, chi2_pvalue, enum_model, exact_power, pair,
                      routed_logp, router_and_vectors)

T = 3
ALPHA = 2.0


@pytest.fixture(scope="module")
def target():
    m = enum_model()
    seqs, probs = exact_power(m, ALPHA, T)
    assert probs.max() < 0.5 and (probs > 0.01).sum() >= 8, "target must be spread enough to test"
    return m, seqs, probs


def run_mh(model, n, seed, **kw):
    ps = PowerSampler(model, alpha=ALPHA, block_size=T, max_new_tokens=T, n_mcmc=kw.pop("n_mcmc", 100),
                      eos_token_id=EOS, **kw)
    return ps.sample([PROMPT], n_chains=n, generator=torch.Generator().manual_seed(seed)), ps


# Fixed seeds; the p-value thresholds are documented: exact MH must not be rejected at 1e-3,
# the official code's procedure must be rejected at 1e-6.
def test_mh_is_exact(target):
    m, seqs, probs = target
    out, _ = run_mh(m, 5000, seed=11)
    p, freq = chi2_pvalue([r.ids for r in out], seqs, probs)
    assert p > 1e-3, f"exact MH rejected: p={p}"
    # plain proposal sampling (no MH steps) is NOT p^alpha: the test has power
    out0, _ = run_mh(m, 6000, seed=11, n_mcmc=0)
    p0, _ = chi2_pvalue([r.ids for r in out0], seqs, probs)
    assert p0 < 1e-6, f"proposal alone not rejected: p={p0}"


def test_official_procedure_is_biased(target):
    m, seqs, probs = target
    out, _ = run_mh(m, 6000, seed=11, official=True)
    p, _ = chi2_pvalue([r.ids for r in out], seqs, probs)
    assert p < 1e-6, f"official-code option not rejected: p={p}"


def test_smc_tv_shrinks_with_particles(target):
    m, seqs, probs = target
    index = {s: i for i, s in enumerate(seqs)}

    def weighted_measure(n_particles, groups, seed, **kw):
        ps = PowerSampler(m, alpha=ALPHA, max_new_tokens=T, method="smc", n_particles=n_particles,
                          eos_token_id=EOS, **kw)
        out = ps.sample([PROMPT] * groups, generator=torch.Generator().manual_seed(seed))
        acc = torch.zeros(len(seqs), dtype=torch.float64)
        for r in out:
            for w, part in zip(r.stats["weights"], r.stats["particle_ids"]):
                acc[index[tuple(part)]] += w
        return acc / groups

    tv8 = 0.5 * (weighted_measure(8, 1500, 1) - probs).abs().sum()
    tv256 = 0.5 * (weighted_measure(256, 60, 2) - probs).abs().sum()
    assert tv256 < tv8, (tv8, tv256)
    assert tv256 < 0.05
    # a ramp longer than the answers ends below alpha: the final weights still target p^alpha
    assert 0.5 * (weighted_measure(256, 60, 2, alpha_ramp=50) - probs).abs().sum() < 0.05


def test_reuse_and_recompute_same_chains_and_counts():
    m = tiny_model("qwen2", seed=1)
    kw = dict(alpha=4, block_size=5, n_mcmc=3, max_new_tokens=15, eos_token_id=-1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    a = PowerSampler(m, reuse=True, **kw)
    ra = a.sample(prompts, n_chains=2, generator=torch.Generator().manual_seed(4))
    b = PowerSampler(m, reuse=False, **kw)
    rb = b.sample(prompts, n_chains=2, generator=torch.Generator().manual_seed(4))
    assert [r.ids for r in ra] == [r.ids for r in rb]
    assert a.last_stats["decoded_tokens"] == b.last_stats["decoded_tokens"]
    P = [3, 3, 5, 5]
    # reuse: prompt prefill + one forward per decoded token (the prefill yields the first)
    assert a.last_stats["token_forwards"] == sum(p - 1 for p in P) + a.last_stats["decoded_tokens"]
    # recompute (the official code's cost): exactly (1 + n_mcmc) * (P + cap_k - 1) per block
    exp = sum(expected_mh_token_forwards(15, 5, 3, p, reuse=False) for p in P)
    assert b.last_stats["token_forwards"] == exp
    acc = [r.stats["acceptance_rate"] for r in ra]
    assert all(0 < x < 1 for x in acc)
    # rejection by re-encoding the old suffix in place (no cache copies): same chains, and the
    # extra token-forwards are exactly the rejected proposals' old suffixes
    c = PowerSampler(m, reject="reprefill", **kw)
    rc = c.sample(prompts, n_chains=2, generator=torch.Generator().manual_seed(4))
    assert [r.ids for r in rc] == [r.ids for r in ra]
    extra = sum(int(((L - mi) * (~acc_)).sum()) for mi, L, _, acc_ in a.last_stats["trace"])
    assert c.last_stats["token_forwards"] == a.last_stats["token_forwards"] + extra


def test_expected_counts_formula_matches_design():
    # DESIGN.md section 2: ~134k decoded tokens for T=3072, B=192, N=10
    dec = expected_mh_token_forwards(3072, 192, 10, prompt_len=1)
    assert abs(dec - 134_000) / 134_000 < 0.01
    rec = expected_mh_token_forwards(3072, 192, 10, prompt_len=1, reuse=False)
    assert rec > dec


def test_seeded_and_bad_input():
    m = tiny_model("llama", seed=2)
    ps = PowerSampler(m, alpha=4, block_size=4, n_mcmc=2, max_new_tokens=8)
    a = ps.sample([[4, 5]], generator=torch.Generator().manual_seed(1))
    b = ps.sample([[4, 5]], generator=torch.Generator().manual_seed(1))
    assert a[0].ids == b[0].ids and a[0].logq == b[0].logq
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        ps.sample([[]])
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        PowerSampler(m, alpha=0.5)
    with pytest.raises(ValueError, match="method must be"):
        PowerSampler(m, method="gibbs")


def test_power_sample_cli_resumes(tmp_path):
    import json
    import subprocess
    import sys
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(dict(id=f"p{i}", question=f"What is {i} + {i}?")) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "hybridfast.cli", "power-sample", str(inp), str(out), "--block-size", "4",
           "--n-mcmc", "1", "--max-new-tokens", "8", "--batch", "2", "--dtype", "fp32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["p0", "p1", "p2"] and all(len(x["ids"]) == len(x["logp"]) for x in rows)
    out.write_text("".join(json.dumps(x) + "\n" for x in rows[:1]))      # lose the last two
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 prompts sampled, 1 already done" in r.stdout
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == ["p0", "p1", "p2"]


def test_power_sampling_the_hybrid_model():
    import sys as _s
    _s.path.insert(0, __import__("os").path.dirname(__file__))
    from helpers import pair, router_and_vectors
    from hybridfast import HybridModel
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    prompts, tprompts = [[5, 6, 7], [8, 9, 10, 11]], [[3, 4], [20, 21, 22]]
    kw = dict(alpha=4, block_size=4, n_mcmc=3, max_new_tokens=12, eos_token_id=-1)

    def run(coef, reuse=True):
        hm = HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1, mode="routed",
                         coefficients=coef, threshold=-1e9)
        ps = PowerSampler(base, steer=hm, reuse=reuse, **kw)
        return [r.ids for r in ps.sample(prompts, thinking_prompts=tprompts, n_chains=2,
                                         generator=torch.Generator().manual_seed(9))]
    plain = [r.ids for r in PowerSampler(base, **kw).sample(prompts, n_chains=2,
                                                            generator=torch.Generator().manual_seed(9))]
    assert run(0.0) == plain                 # zero coefficients: exactly the unsteered sampler
    steered = run(2.0)
    assert steered != plain                  # steering changes the chains
    assert run(2.0, reuse=False) == steered  # and KV reuse is exact under steering too
    with pytest.raises(ValueError, match="routed mode"):
        PowerSampler(base, steer=HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1))


def test_power_smc_of_the_hybrid_model():
    """Power-SMC with steer=: zero coefficients give exactly the unsteered particles; real ones
    change them, resampling copies the thinking router's cache rows too, and every particle's
    recorded log p equals the routed model's teacher-forced one."""
    from hybridfast import HybridModel
    base, think = pair("qwen2")
    sae, vec = router_and_vectors(64, 64)
    prompts, tprompts = [[5, 6, 7], [8, 9, 10, 11]], [[3, 4], [20, 21, 22]]
    kw = dict(method="smc", alpha=4, n_particles=4, ess_threshold=1.0, max_new_tokens=8, eos_token_id=-1)

    def run(coef):
        hm = HybridModel(base, think, sae, vec, sae_layer=2, steer_layer=1, mode="routed",
                         coefficients=coef, threshold=-1e9)
        ps = PowerSampler(base, steer=hm, **kw)
        return hm, ps, ps.sample(prompts, thinking_prompts=tprompts, generator=torch.Generator().manual_seed(4))
    plain = PowerSampler(base, **kw).sample(prompts, generator=torch.Generator().manual_seed(4))
    assert [(r.ids, r.logp) for r in run(0.0)[2]] == [(r.ids, r.logp) for r in plain]
    hm, ps, out = run(2.0)
    assert [r.ids for r in out] != [r.ids for r in plain]
    assert ps.last_stats["resampling_events"] > 0            # ESS threshold 1: rows were copied
    for r in out:
        ref = routed_logp(hm, prompts[r.prompt_index], tprompts[r.prompt_index], r.ids)
        assert r.logp == pytest.approx(ref.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="thinking prompt"):
        PowerSampler(base, steer=hm, **kw).sample(prompts, generator=torch.Generator().manual_seed(4))
