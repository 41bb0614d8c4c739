"""Scalable power sampling (hybridfast.scalable) on a model whose p^alpha can be enumerated.

The estimator's expectation is computed exactly (no jackknife: a one-dimensional integral, below)
or by drawing rollouts from the exact future distributions (jackknife). Against it: the bias
shrinks with M and faster with the jackknife; the sampler's whole-sequence frequencies pass a
chi-square test. Also: shared-prefix rows equal copied-prefix rows, token-forward counts, seeds,
errors, and the eval / power-sample command lines.
"""
import math

import pytest
import torch
from scipy.integrate import quad

from hybridfast.model import DecoderModel
from hybridfast.power import PowerSampler
from hybridfast.scalable import candidate_probs, expected_token_forwards
from hybridfast.tiny import tiny_model

from .helpers import ENUM_EOS as EOS, ENUM_PROMPT as PROMPT, chi2_pvalue, complete_sequences, enum_model

T, ALPHA, V = 3, 2.0, 4


class Enumerated:
    """Exact quantities of the sampler's decisions on the enumerable model (K = V candidates):
    a decision after generated tokens ``prefix`` rolls out ``h = min(H, T - len(prefix) - 1)``
    tokens after each candidate (none after EOS)."""

    def __init__(self, model):
        self.model, self.conds = model, {}

    @torch.no_grad()
    def cond(self, prefix: tuple) -> torch.Tensor:
        """log p(. | prompt + prefix), float64 [V]."""
        if prefix not in self.conds:
            logits = self.model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
            self.conds[prefix] = torch.log_softmax(logits.double(), -1)
        return self.conds[prefix]

    def futures(self, prefix: tuple, h: int) -> torch.Tensor:
        """log p of every rollout of at most ``h`` tokens after ``prefix`` (stopped at EOS); one
        empty rollout (log p = 0) when ``h = 0``."""
        if h == 0:
            return torch.zeros(1, dtype=torch.float64)
        lp = self.cond(prefix)
        return torch.cat([lp[y].reshape(1) if y == EOS or h == 1 else lp[y] + self.futures(prefix + (y,), h - 1)
                          for y in range(V)])

    def decision(self, prefix: tuple, H: int):
        h = min(H, T - len(prefix) - 1)
        return self.cond(prefix), [self.futures(prefix + (x,), 0 if x == EOS else h) for x in range(V)]

    def exact(self, prefix: tuple) -> torch.Tensor:
        """The next-token conditional of p^alpha (Theorem 3.1 with the exact zeta)."""
        lp, fut = self.decision(prefix, T)
        return torch.softmax(ALPHA * lp + torch.stack([torch.logsumexp(ALPHA * f, 0) for f in fut]), 0)

    def expected(self, prefix: tuple, M: int, H: int = T) -> torch.Tensor:
        """E[p_hat] without the jackknife, exactly: with a_y = p(y)^alpha and Z_y the mean of M
        i.i.d. weights W = p(rollout)^(alpha - 1), 1/S = int_0^inf exp(-tS) dt turns
        E[a_x Z_x / sum_y a_y Z_y] into int_0^inf E[a_x Z_x e^(-t a_x Z_x)] prod_(y != x)
        E[e^(-t a_y Z_y)] dt, and each expectation of a mean of M i.i.d. terms factorises."""
        lp, fut = self.decision(prefix, H)
        a = (ALPHA * lp).exp().tolist()
        q, w = [f.exp() for f in fut], [((ALPHA - 1) * f).exp() for f in fut]
        scale = sum(ai * float((qi * wi).sum()) for ai, qi, wi in zip(a, q, w))    # t in units of 1 / E[S]

        def laplace(y, t):                      # E exp(-t a_y Z_y)
            return float((q[y] * torch.exp(-t * a[y] * w[y] / M)).sum()) ** M

        def tilted(y, t):                       # E a_y Z_y exp(-t a_y Z_y)
            e = torch.exp(-t * a[y] * w[y] / M)
            return a[y] * float((q[y] * w[y] * e).sum()) * float((q[y] * e).sum()) ** (M - 1)

        def integrand(u, x):
            t = u / scale
            return tilted(x, t) * math.prod(laplace(y, t) for y in range(V) if y != x) / scale
        return torch.tensor([quad(integrand, 0, math.inf, args=(x,), epsabs=1e-14, epsrel=1e-11, limit=200)[0]
                             for x in range(V)], dtype=torch.float64)

    def simulated(self, prefix: tuple, M: int, jackknife: bool, n: int, seed: int = 0) -> torch.Tensor:
        """The mean of ``candidate_probs`` over ``n`` sets of rollouts drawn from the exact futures."""
        lp, fut = self.decision(prefix, T)
        g = torch.Generator().manual_seed(seed)
        log_w = torch.stack([(ALPHA - 1) * f[torch.multinomial(f.exp(), n * M, replacement=True, generator=g)]
                             .view(n, M) for f in fut], 1)
        return candidate_probs((ALPHA * lp).expand(n, V), log_w, jackknife).mean(0)

    def sequence_probs(self, seqs, step) -> torch.Tensor:
        """Probability of each complete sequence when each token is drawn from ``step(prefix)``."""
        return torch.tensor([math.prod(float(step(s[:i])[x]) for i, x in enumerate(s)) for s in seqs],
                            dtype=torch.float64)


@pytest.fixture(scope="module")
def enum():
    return Enumerated(enum_model())


def tv(p, q) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_candidate_probs_is_the_ratio_estimate_and_its_jackknife():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(3, 5, generator=g, dtype=torch.float64)
    score[0, 4] = -math.inf                                     # not a candidate
    log_w = torch.randn(3, 5, 6, generator=g, dtype=torch.float64) * 2
    log_w[:, 1] = 0                                             # no future (EOS)
    M = log_w.shape[-1]
    p = torch.softmax(score + torch.log(log_w.exp().mean(-1)), -1)
    assert torch.allclose(candidate_probs(score, log_w, False), p, rtol=0, atol=1e-14)
    loo = sum(torch.softmax(score + torch.log(torch.cat([log_w[..., :s], log_w[..., s + 1:]], -1).exp().mean(-1)), -1)
              for s in range(M))
    jk = (M * p - (M - 1) / M * loo).clamp_min(0)
    got = candidate_probs(score, log_w, True)
    assert torch.allclose(got, jk / jk.sum(-1, keepdim=True), rtol=0, atol=1e-13)
    assert got[0, 4] == 0 and (got >= 0).all()
    assert not torch.allclose(got, p, atol=1e-3)                # the correction does something here


def test_bias_shrinks_with_M_and_faster_with_the_jackknife(enum):
    """TV between the next-token distribution the sampler draws from (the estimator's expectation)
    and the exact p^alpha conditional, K = V and H covering the answer."""
    exact = enum.exact(())
    plain = {M: tv(enum.expected((), M), exact) for M in (2, 8, 64)}
    jack = {M: tv(enum.simulated((), M, True, n), exact) for M, n in ((2, 200_000), (8, 200_000), (64, 20_000))}
    assert plain[2] > plain[8] > plain[64] and plain[2] > 0.005          # O(1/M) bias, exact values
    assert jack[2] < 0.4 * plain[2] and jack[8] < 0.4 * plain[8]        # the jackknife removes most of it
    assert jack[8] < jack[2] and jack[64] < plain[8]
    # the simulation agrees with the exact expectation where both exist (validates both)
    sim = enum.simulated((), 8, False, 200_000, seed=1)
    assert (sim - enum.expected((), 8)).abs().max() < 5e-4


def test_sequence_frequencies_match_the_estimators_expectation(enum):
    """K = V, M = 16, H covering the answer, no jackknife: the sampler's complete sequences against
    the product over steps of the estimator's exact expected distribution."""
    M, n = 16, 2000
    ps = PowerSampler(enum.model, method="scalable", alpha=ALPHA, max_new_tokens=T, n_candidates=V, n_rollouts=M,
                      horizon=T, jackknife=False, eos_token_id=EOS)
    out = ps.sample([PROMPT], n_chains=n, generator=torch.Generator().manual_seed(3))
    seqs = complete_sequences(T)
    expected = enum.sequence_probs(seqs, lambda prefix: enum.expected(prefix, M))
    assert abs(float(expected.sum()) - 1) < 1e-9
    p, _ = chi2_pvalue([r.ids for r in out], seqs, expected)
    assert p > 1e-3, f"scalable sampler rejected against its own expectation: p={p}"
    # the test has power: low-temperature sampling (p^alpha per token, no future factor) is rejected
    low_temp = enum.sequence_probs(seqs, lambda prefix: torch.softmax(ALPHA * enum.cond(prefix), 0))
    p_low, _ = chi2_pvalue([r.ids for r in out], seqs, low_temp)
    assert p_low < 1e-6, f"low-temperature distribution not rejected: p={p_low}"
    # logq is the log-probability of each decision, logp the base log-probability of each token
    r = out[0]
    assert r.logp == pytest.approx([float(enum.cond(tuple(r.ids[:i]))[x]) for i, x in enumerate(r.ids)], abs=1e-5)
    assert all(q <= 0 for q in r.logq) and len(r.logq) == len(r.ids)


def test_jackknife_through_the_sampler(enum):
    """M = 2 with the jackknife: first-token frequencies against the jackknife estimator's
    expectation (simulated from the exact futures)."""
    ps = PowerSampler(enum.model, method="scalable", alpha=ALPHA, max_new_tokens=T, n_candidates=V, n_rollouts=2,
                      horizon=T, eos_token_id=EOS)
    out = ps.sample([PROMPT], n_chains=2000, generator=torch.Generator().manual_seed(5))
    expected = enum.simulated((), 2, True, 200_000)
    p, _ = chi2_pvalue([r.ids[:1] for r in out], [(x,) for x in range(V)], expected)
    assert p > 1e-3, f"jackknife sampler rejected: p={p}"


@torch.no_grad()
def test_shared_prefix_block_equals_attention_over_a_copied_prefix():
    m = DecoderModel(tiny_model("qwen2", seed=3, dtype=torch.float64))
    N, R, P = 2, 3, torch.tensor([5, 3])
    main = m.new_cache(N, 12)
    m.run(m.embed(torch.randint(3, 90, (N, 5))), m.prefill_plan(P, 5, main, 5), main, 0, m.n_layers)
    rows = torch.arange(N).repeat_interleave(R)
    copied = main.index_select(rows)
    copied.lengths.copy_(P[rows])
    own = m.new_cache(N * R, 3)
    visible = torch.arange(5)[None, None, :] < P[:, None, None]
    prefix_mask = torch.zeros(N, 1, 5, dtype=torch.float64).masked_fill_(~visible, -math.inf)
    for t, tok in enumerate(torch.randint(3, 90, (3, N * R))):
        ref = m.run(m.embed(tok[:, None]), m.decode_plan(copied, 0, 5 + t + 1), copied, 0, m.n_layers)
        copied.lengths += 1
        plan = m.plan((P[rows] + t)[:, None], torch.full((N * R, 1), t), torch.ones(N * R, 1, t + 1, dtype=torch.bool))
        h = m.embed(tok[:, None])
        for i in range(m.n_layers):
            h = m.shared_prefix_block(i, h, plan, own, main, prefix_mask)
        assert (m.logits(h[:, 0]) - m.logits(ref[:, 0])).abs().max() < 1e-10


@pytest.mark.parametrize("variant", ["token", "block"])
def test_shared_prefix_rows_sample_what_copied_prefix_rows_sample(variant):
    m = tiny_model("qwen2", seed=1)
    kw = dict(method="scalable", variant=variant, alpha=4, max_new_tokens=8, n_candidates=3, n_rollouts=4,
              horizon=3, n_proposals=5, block_size=3, eos_token_id=2)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    runs = {}
    for prefix_kv in ("shared", "copy"):
        ps = PowerSampler(m, prefix_kv=prefix_kv, **kw)
        runs[prefix_kv] = (ps.sample(prompts, n_chains=3, generator=torch.Generator().manual_seed(7)), ps.last_stats)
    (shared, s_stats), (copied, c_stats) = runs["shared"], runs["copy"]
    assert [r.ids for r in shared] == [r.ids for r in copied]
    assert len({tuple(r.ids) for r in shared}) > 1
    for a, b in zip(shared, copied):
        assert a.logp == pytest.approx(b.logp, abs=1e-4) and a.logq == pytest.approx(b.logq, abs=1e-4)
    assert s_stats["token_forwards"] == c_stats["token_forwards"]
    assert s_stats["rollout_tokens"] == c_stats["rollout_tokens"] > 0
    assert s_stats["peak_cache_bytes"] < c_stats["peak_cache_bytes"] / 2
    assert s_stats["copied_cache_bytes"] < c_stats["copied_cache_bytes"] / 2


def test_token_forwards_follow_the_closed_form():
    m = tiny_model("llama", seed=2)
    prompts = [[4, 5], [6, 7, 8, 9]]
    settings = [dict(variant="token", n_candidates=3, n_rollouts=2, horizon=3),
                dict(variant="block", n_candidates=1, n_rollouts=3, horizon=2, n_proposals=1, block_size=3)]
    for s in settings:      # one proposal per block: no duplicate is ever dropped, the count is exact
        ps = PowerSampler(m, method="scalable", alpha=4, max_new_tokens=10, jackknife=False, eos_token_id=-1, **s)
        out = ps.sample(prompts, generator=torch.Generator().manual_seed(0))
        assert [len(r.ids) for r in out] == [10, 10]
        assert ps.last_stats["token_forwards"] == sum(expected_token_forwards(10, len(p), **s) for p in prompts)


def test_seeded():
    m = tiny_model("qwen2", seed=4)
    ps = PowerSampler(m, method="scalable", alpha=4, max_new_tokens=5, n_candidates=4, n_rollouts=3, horizon=2,
                      eos_token_id=-1)
    a, b, c = (ps.sample([[4, 5, 6]], n_chains=4, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert [r.ids for r in a] == [r.ids for r in b] and [r.logq for r in a] == [r.logq for r in b]
    assert [r.ids for r in a] != [r.ids for r in c]


def test_bad_settings_are_refused_by_name():
    m = tiny_model("qwen2", seed=0)
    for kw, message in [(dict(n_candidates=0), r"n_candidates \(K\) must be an integer >= 1, got 0"),
                        (dict(n_rollouts=0, jackknife=False), r"n_rollouts \(M\) must be .* got 0"),
                        (dict(horizon=0), r"horizon \(H\) must be .* got 0"),
                        (dict(n_proposals=0), r"n_proposals \(L\) must be .* got 0"),
                        (dict(n_rollouts=1), r"needs n_rollouts \(M\) >= 2, got 1"),
                        (dict(n_candidates=97), r"K\) = 97 exceeds the vocabulary \(96 tokens\)"),
                        (dict(variant="block", n_candidates=9, n_proposals=8), r"need K <= L, got K = 9, L = 8"),
                        (dict(variant="tokens"), "variant must be one of"),
                        (dict(prefix_kv="cow"), "prefix_kv must be one of")]:
        with pytest.raises(ValueError, match=message):
            PowerSampler(m, method="scalable", **kw)
    for kw in (dict(compile=True), dict(top_k=5), dict(official=True)):
        with pytest.raises(NotImplementedError, match="method='scalable' takes no compile="):
            PowerSampler(m, method="scalable", **kw)


def test_eval_and_power_sample_run_the_scalable_sampler(tmp_path, capsys):
    import json
    from hybridfast.eval import ResultsLog, main
    from hybridfast.power_cli import main as power_main
    from .helpers import refused
    args = ["--method", "power-scalable", "--out", str(tmp_path / "e"), "--limit", "1", "--max-new-tokens", "3",
            "--dtype", "fp32", "--n-candidates", "2", "--n-rollouts", "2", "--horizon", "2"]
    main(args)
    run = ResultsLog(tmp_path / "e" / "results.jsonl").rows()[0]["run"]["power"]
    assert {k: run[k] for k in ("method", "variant", "n_candidates", "n_rollouts", "horizon", "jackknife")} == \
        dict(method="scalable", variant="token", n_candidates=2, n_rollouts=2, horizon=2, jackknife=True)
    capsys.readouterr()
    assert "power.jackknife: true -> false" in refused(args + ["--no-jackknife"], capsys)
    assert "--n-rollouts must be >= 1, got 0" in refused(args + ["--n-rollouts", "0"], capsys)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(dict(id="a", question="What is 1 + 1?")) + "\n")
    out = tmp_path / "out.jsonl"
    power_main([str(inp), str(out), "--method", "scalable", "--variant", "block", "--block-size", "2",
                "--n-proposals", "3", "--n-candidates", "2", "--n-rollouts", "2", "--horizon", "2",
                "--max-new-tokens", "4", "--dtype", "fp32"])
    row = json.loads(out.read_text())
    assert len(row["ids"]) == len(row["logq"]) > 0
    summary = json.loads(out.with_name("out.jsonl.summary.json").read_text())
    assert summary["run"]["sampler"]["variant"] == "block" and summary["totals"]["rollout_tokens"] > 0
