"""Scalable power sampling (Ji, Tutunov, Zimmer, Bou Ammar 2026, arXiv 2601.21590; DESIGN.md 2.1):
``PowerSampler(method="scalable")``.

Theorem 3.1 of the paper: the next-token conditional of p^alpha is

    p_alpha(x | prefix)  ∝  p(x | prefix)^alpha * zeta(x),    zeta(x) = sum_y p(y | prefix, x)^alpha

over all futures ``y``. Since ``zeta(x) = E_{y ~ p(.|prefix, x)}[p(y | prefix, x)^(alpha - 1)]``, it
is estimated from ``M`` rollouts drawn from the base model at temperature 1, each stopped at EOS
or after ``H`` tokens (the horizon):

    zeta_hat(x) = (1/M) sum_r p(y_r | prefix, x)^(alpha - 1)

and the next token is drawn from ``p(x)^alpha zeta_hat(x)`` normalised over the ``K`` candidates.
Everything is computed in log space (log-sum-exp). The normalised ratio is biased by O(1/M); the
jackknife (``jackknife=True``) takes ``M p_hat - (M - 1)/M sum_s p_hat_(-s)`` with ``p_hat_(-s)``
the same estimate without rollout ``s`` of every candidate, clips it at 0 and renormalises.

This is an approximation: at finite ``M`` and with ``H`` shorter than the rest of the answer, or
``K`` below the vocabulary, it does not sample p^alpha (block-wise MH, ``method="mh"``, does). With
``K`` = vocabulary and ``H`` covering the answer it converges to p^alpha as ``M`` grows.

``variant="token"`` (the paper's Algorithm 1): the candidates are the top-``K`` tokens by base
probability; the last token (no future left) is drawn from ``p^alpha`` over them.

``variant="block"`` (their appendix): ``L = n_proposals`` blocks of up to ``block_size`` tokens are
drawn at temperature ``1/alpha``; the ``K`` most likely distinct blocks (sum of log p at
temperature 1; a block proposed twice counts once) are scored the same way, ``p(block)^alpha
zeta_hat(block)``, with rollouts after each block; the last block (no future left) is chosen by
``p(block)^alpha`` alone. Log-likelihoods are sums over tokens, never per-token means (a mean
changes the target).

Engine: all prompts and chains advance in lockstep (a finished row idles and is not counted). A
decision's candidates, proposals and rollouts are extra rows that continue the row's sequence.
``prefix_kv="shared"`` (default): they hold only their own tokens' K/V and attend over the
single cached copy of the prefix (``DecoderModel.shared_prefix_block``: a softmax partial over
the prefix and one over the row's own tokens, merged by log-sum-exp). ``prefix_kv="copy"``: each
such row gets a copy of the prefix cache (the copy-on-write alternative; the same samples up
to float rounding at near-ties). The
chosen candidate's K/V are copied into the row's cache, so the output itself costs no forward.
``steer=`` (a routed :class:`~hybridfast.hybrid.HybridModel` over the sampled model): every
forward of the sampled model (prefill, candidates, proposals, rollouts) is the routed one; the
thinking model's router (blocks up to ``sae_layer``) reads the same tokens after its own prompt,
with its own prefix cache and rows opened, selected and written back in step, and ``route_steer``
applies to the residual entering ``steer_layer`` at every generated position (the position that
produces a token is steered by the category routed there, as in routed generation). ``logp`` is
then the routed model's; token-forwards count the sampled model's forwards only.
Token-forwards per decision of the token variant: ``K`` (candidates) + ``K M (h - 1)`` (the
rollouts' tokens but the last, whose log-probability comes from the step before), ``h = min(H,
tokens left after the candidate)``; see :func:`expected_token_forwards`.

Results: ``PowerResult.logp`` holds log p (temperature 1) of each token; ``logq`` the
log-probability with which a decision chose it, on the decision's first token (0 on the other
tokens of a block), so ``sum(logq)`` is the log-probability of all the sample's decisions given
their candidates and rollouts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import ops
from .chains import Chains
from .engine import pad_id
from .model import DecoderModel, KVCache

__all__ = ["VARIANTS", "PREFIX_KV", "check_settings", "candidate_probs", "expected_token_forwards", "sample"]

VARIANTS = ("token", "block")
#: how candidate, proposal and rollout rows read the prefix's K/V (see the module doc)
PREFIX_KV = ("shared", "copy")


def check_settings(*, variant: str, n_candidates: int, n_rollouts: int, horizon: int, n_proposals: int,
                   jackknife: bool, prefix_kv: str, vocab_size: Optional[int]) -> None:
    """A ``ValueError`` naming the first setting out of range (``vocab_size`` None: not known yet,
    not checked)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if prefix_kv not in PREFIX_KV:
        raise ValueError(f"prefix_kv must be one of {PREFIX_KV}, got {prefix_kv!r}")
    for name, value in (("n_candidates (K)", n_candidates), ("n_rollouts (M)", n_rollouts),
                        ("horizon (H)", horizon), ("n_proposals (L)", n_proposals)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if jackknife and n_rollouts < 2:
        raise ValueError(f"the jackknife leaves one rollout out: it needs n_rollouts (M) >= 2, got {n_rollouts} "
                         f"(or pass jackknife=False)")
    if variant == "token" and vocab_size is not None and n_candidates > vocab_size:
        raise ValueError(f"n_candidates (K) = {n_candidates} exceeds the vocabulary ({vocab_size} tokens)")
    if variant == "block" and n_candidates > n_proposals:
        raise ValueError(f"the block variant keeps n_candidates (K) of n_proposals (L) blocks: need K <= L, "
                         f"got K = {n_candidates}, L = {n_proposals}")


def candidate_probs(score: torch.Tensor, log_w: torch.Tensor, jackknife: bool) -> torch.Tensor:
    """The distribution a decision samples from, ``[N, K]`` float64.

    ``score [N, K]``: ``alpha * log p(candidate)`` (``-inf``: not a candidate); ``log_w [N, K, M]``:
    ``(alpha - 1) * log p(rollout r of the candidate)`` (0 for a candidate with no future: EOS,
    or no tokens left). Without the jackknife: ``softmax(score + log zeta_hat)``; with it:
    ``M p_hat - (M - 1)/M sum_s p_hat_(-s)`` clipped at 0 and renormalised (its sum before
    clipping is 1, so at least one entry stays positive).
    """
    score, log_w = score.double(), log_w.double()
    M = log_w.shape[-1]
    p = torch.softmax(score + torch.logsumexp(log_w, -1) - math.log(M), -1)
    if not jackknife:
        return p
    if M < 2:
        raise ValueError(f"the jackknife needs M >= 2 rollouts per candidate, got {M}")
    # log of the sum of the weights without rollout s: prefix and suffix log-sum-exps, exact and stable
    before = torch.logcumsumexp(log_w, -1)
    after = torch.logcumsumexp(log_w.flip(-1), -1).flip(-1)
    none = torch.full_like(log_w[..., :1], -math.inf)
    without = torch.logaddexp(torch.cat([none, before[..., :-1]], -1), torch.cat([after[..., 1:], none], -1))
    p_loo = torch.softmax(score[..., None] + without - math.log(M - 1), 1)     # [N, K, M], one per s
    p_jk = (M * p - (M - 1) / M * p_loo.sum(-1)).clamp_min(0)
    return p_jk / p_jk.sum(-1, keepdim=True)


def expected_token_forwards(max_new_tokens: int, prompt_len: int, *, variant: str = "token",
                            n_candidates: int = 8, n_rollouts: int = 8, horizon: int = 192,
                            n_proposals: int = 32, block_size: int = 192) -> int:
    """Token-forwards of one chain that never emits EOS: its prompt prefill plus, per decision at
    generated length ``t`` with ``h = min(H, tokens left after the candidate)``: token variant
    ``K + K M (h - 1)`` when ``h >= 1`` (nothing at the last token); block variant (block of
    ``b = min(B, T - t)`` tokens) ``L (b - 1)`` proposal tokens, plus ``L + K M (h - 1)`` when
    ``h >= 1`` (the proposals' last tokens and the rollouts). A block variant run with duplicate
    proposals rolls out fewer blocks and counts less."""
    total, t, T = prompt_len, 0, max_new_tokens
    K, M, H = n_candidates, n_rollouts, horizon
    while t < T:
        b = 1 if variant == "token" else min(block_size, T - t)
        h = min(H, T - t - b)
        if variant == "block":
            total += n_proposals * (b - 1)
        if h >= 1:
            total += (K if variant == "token" else n_proposals) + K * M * (h - 1)
        t += b
    return total


def _bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.kv)


@dataclass
class _Side:
    """One model's part of the batch: the model, the cache of the batch rows (``main``), their
    prompt lengths ``P [N]`` (padded to ``S``) and how many blocks this side runs (all of the
    sampled model; the thinking model's router with ``steer=``: blocks ``0 .. sae_layer``)."""
    m: DecoderModel
    main: KVCache
    P: torch.Tensor
    S: int
    n_layers: int

    @classmethod
    def new(cls, m: DecoderModel, P: torch.Tensor, T: int, n_layers: int) -> "_Side":
        S = int(P.max())
        return cls(m, m.new_cache(P.shape[0], S + T + 1, layers=n_layers), P, S, n_layers)


def _copy_rows(run: "_Run", cache: KVCache, rows: torch.Tensor, written: int, slots: int,
               lengths: torch.Tensor) -> KVCache:
    """A cache of ``slots`` slots per row holding ``cache``'s ``rows``: their first ``written``
    slots copied (counted in ``run.copied_bytes``), the others zeroed; ``lengths`` held."""
    kv = [t.new_zeros((rows.shape[0], t.shape[1], slots, t.shape[3])) for t in cache.kv]
    for new, old in zip(kv, cache.kv):
        torch.index_select(old[:, :, :written], 0, rows, out=new[:, :, :written])
    copy = KVCache(kv, lengths, 0)
    run.copied_bytes += _bytes(copy) // kv[0].shape[2] * written
    return copy


class _Branches:
    """``R`` rows per row of the batch that continue its sequence after its ``P + L`` cached
    tokens (candidates, block proposals, rollouts), all with the same number of own tokens fed so
    far (``n``), on one side (``side``). ``prefix_kv="shared"``: ``cache`` holds only their own
    tokens and they attend over the side's batch cache for the prefix (``prefix_mask``);
    ``"copy"``: ``cache`` holds copies of the batch's rows (``prefix_mask`` None). With
    ``steer=`` the sampled model's branches carry their twins on the thinking side (``think``):
    opened, fed, selected and written back in step, the router reading the same tokens after
    its own prompt."""

    def __init__(self, run: "_Run", side: _Side, R: int, cache: KVCache, start: torch.Tensor, n: int,
                 prefix_mask: Optional[torch.Tensor], think: Optional["_Branches"]):
        self.run, self.side, self.R, self.cache, self.start, self.n = run, side, R, cache, start, n
        self.prefix_mask, self.think = prefix_mask, think

    @classmethod
    def open(cls, run: "_Run", R: int, capacity: int) -> "_Branches":
        """``R`` new rows per batch row, with room for ``capacity`` own tokens each."""
        think = None if run.think is None else cls._open(run, run.think, R, capacity, None)
        branches = cls._open(run, run.base, R, capacity, think)
        run.note_peak(branches)
        return branches

    @classmethod
    def _open(cls, run: "_Run", side: _Side, R: int, capacity: int, think) -> "_Branches":
        m, N = side.m, run.N
        start = (side.P + run.L).repeat_interleave(R)           # position of each row's first own token
        if run.ps.prefix_kv == "copy":
            rows, prefix = torch.arange(N, device=m.device).repeat_interleave(R), side.S + run.L
            cache = _copy_rows(run, side.main, rows, prefix, prefix + capacity, start.clone())
            return cls(run, side, R, cache, start, 0, None, think)
        visible = torch.arange(side.S + run.L, device=m.device)[None, None, :] < (side.P + run.L)[:, None, None]
        mask = torch.zeros(visible.shape, dtype=m.dtype, device=m.device).masked_fill_(~visible, float("-inf"))
        return cls(run, side, R, m.new_cache(N * R, capacity, layers=side.n_layers), start, 0, mask, think)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' own caches (with their thinking twins')."""
        return _bytes(self.cache) + (0 if self.think is None else self.think.nbytes)

    def feed(self, tok: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``tok [N * R]``), return the logits after it; ``counted``: the
        rows whose forward counts as work (live rows of unfinished problems)."""
        x = None if self.think is None else self.think.forward(tok)
        h = self.forward(tok, x)
        self.run.forwards += counted.sum()
        return self.side.m.logits(h)

    def forward(self, tok: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This side's blocks on one more token per row; returns the last block's output ``[N *
        R, d]``. With ``x`` (the thinking router's residual at the same token) ``route_steer``
        applies to the residual entering ``steer_layer``, as :meth:`HybridModel.routed_forward`."""
        m, hm = self.side.m, self.run.ps.steer
        hooks = None if x is None else {hm.steer_layer: lambda h, plan: (hm.route(h[:, 0], x)[0][:, None], plan)}
        h = m.forward(tok[:, None], self._plan(), self.cache, hooks, self.side.n_layers, self._block())
        if self.prefix_mask is None:
            self.cache.lengths.add_(1)
        self.n += 1
        return h[:, 0]

    def _plan(self):
        m = self.side.m
        if self.prefix_mask is None:
            return m.decode_plan(self.cache, 0, self.side.S + self.run.L + self.n + 1)
        B = self.start.shape[0]
        slots = torch.full((B, 1), self.n, dtype=torch.int64, device=m.device)
        return m.plan((self.start + self.n)[:, None], slots,
                      torch.ones(B, 1, self.n + 1, dtype=torch.bool, device=m.device))

    def _block(self):
        """The block function of these branches: cascade attention over the shared prefix, or
        (copied prefix) the plain block."""
        m = self.side.m
        if self.prefix_mask is None:
            return None
        return lambda i, h, plan, cache: m.shared_prefix_block(i, h, plan, cache, self.side.main,
                                                               self.prefix_mask)

    def select(self, local: torch.Tensor) -> "_Branches":
        """New branches whose row ``(b, j)`` copies row ``local[b, j]`` of this one's batch row ``b``
        (``local [N, R']``): the slots written so far, the rest zeroed."""
        branches = self._select(local)
        self.run.note_peak(self, branches)
        return branches

    def _select(self, local: torch.Tensor) -> "_Branches":
        N, R = local.shape
        rows = (torch.arange(N, device=local.device)[:, None] * self.R + local).reshape(-1)
        written = self.n if self.prefix_mask is not None else self.side.S + self.run.L + self.n
        cache = _copy_rows(self.run, self.cache, rows, written, self.cache.kv[0].shape[2],
                           self.cache.lengths.index_select(0, rows))
        think = None if self.think is None else self.think._select(local)
        return _Branches(self.run, self.side, R, cache, self.start.index_select(0, rows), self.n,
                         self.prefix_mask, think)

    def write_back(self, chosen: torch.Tensor, n: int) -> None:
        """Copy the K/V of the first ``n`` own tokens of row ``chosen[b]`` of each batch row ``b`` into
        the side's batch cache after its prefix (and the thinking twins' into the router's)."""
        run, main = self.run, self.side.main
        rows = torch.arange(chosen.shape[0], device=chosen.device)
        j = torch.arange(n, device=chosen.device)[None, :]
        dst = (self.side.P + run.L)[:, None] + j
        src = dst if self.prefix_mask is None else j
        src_rows = rows * self.R + chosen
        for a, b in zip(main.kv, self.cache.kv):
            a[rows[:, None], :, dst] = b[src_rows[:, None], :, src]
        run.copied_bytes += _bytes(main) // main.kv[0].shape[2] * n
        if self.think is not None:
            self.think.write_back(chosen, n)


class _Run:
    """One ``sample`` call: the batch's caches (the sampled model's, and with ``steer=`` the
    thinking router's), tokens and counters, advanced a decision at a time (every unfinished row
    has the same generated length ``L``)."""

    def __init__(self, ps, prompts: list, rng, thinking: Optional[list]):
        self.ps, self.m, self.rng = ps, ps.m, rng
        dev = self.m.device
        self.N, self.T = len(prompts), ps.max_new_tokens
        ch = Chains.from_prompts(prompts, pad=pad_id(ps.eos), n_gen=self.T, device=dev,
                                 width=max(map(len, prompts)) + self.T + 1, thinking=thinking,
                                 twidth=0 if thinking is None else max(map(len, thinking)))
        self.tokens, self.P, self.lp, self.lq = ch.tokens, ch.P, ch.lp, ch.lq
        self.base = _Side.new(self.m, self.P, self.T, self.m.n_layers)
        hm = ps.steer
        self.think = None if hm is None else _Side.new(hm.thinking.m, ch.Pt, self.T, hm.sae_layer + 1)
        self.length = torch.zeros(self.N, dtype=torch.int64, device=dev)
        self.done = torch.zeros(self.N, dtype=torch.bool, device=dev)
        self.eos = torch.tensor(ps.eos or [-1], device=dev)
        self.L = 0
        self.forwards = self.P.sum()
        self.rollout_tokens = torch.zeros((), dtype=torch.int64, device=dev)
        self.proposal_tokens = torch.zeros((), dtype=torch.int64, device=dev)
        self.copied_bytes = 0
        self.peak_bytes = self.main_bytes()
        self.logits = ps.prefill(self.base.main, self.tokens, self.P, ch,
                                 None if self.think is None else self.think.main)

    def main_bytes(self) -> int:
        return sum(_bytes(s.main) for s in (self.base, self.think) if s is not None)

    def note_peak(self, *branches: _Branches) -> None:
        self.peak_bytes = max(self.peak_bytes, self.main_bytes() + sum(b.nbytes for b in branches))

    def sample_tokens(self, logits: torch.Tensor, temperature: float):
        return ops.sample_logprobs(logits, temperature, seed=self.rng.next_seed(), check_nan=False)

    def run(self) -> None:
        step = self.token_step if self.ps.variant == "token" else self.block_step
        while self.L < self.T and not bool(self.done.all()):
            step()

    # ------------------------------------------------------------------ decisions
    def choose(self, score: torch.Tensor, log_w: Optional[torch.Tensor]):
        """Draw a candidate per row; returns ``(index [N], log-probability of the draw [N])``."""
        if log_w is None:                    # nothing left after the candidates: zeta = 1
            probs = candidate_probs(score, torch.zeros_like(score)[..., None], False)
        else:
            probs = candidate_probs(score, log_w, self.ps.jackknife)
        pick = self.rng.categorical(probs, 1)[:, 0]
        return pick, torch.log(probs.gather(1, pick[:, None]))[:, 0].float()

    def rollouts(self, br: _Branches, keep: torch.Tensor, logits: torch.Tensor, h: int,
                 live: torch.Tensor) -> torch.Tensor:
        """``(alpha - 1) * log p`` of ``M`` rollouts (temperature 1, at most ``h`` tokens, stopped at
        EOS) after each kept row of ``br`` (``keep [N, K]``: local row indices; ``logits``: ``br``'s
        logits after its last fed token; ``live [N, K]``: rows to roll out, the others get 0)."""
        M, (N, K) = self.ps.n_rollouts, keep.shape
        local = keep.repeat_interleave(M, 1)
        ro = br.select(local)
        lg = logits.index_select(0, (torch.arange(N, device=keep.device)[:, None] * br.R + local).reshape(-1))
        alive = live.repeat_interleave(M, 1).reshape(-1)
        total = torch.zeros(alive.shape, dtype=torch.float64, device=alive.device)
        for t in range(h):
            tok, lp, _ = self.sample_tokens(lg, 1.0)
            total += torch.where(alive, lp.double(), 0.0)
            self.rollout_tokens += alive.sum()
            alive = alive & ~torch.isin(tok, self.eos)
            if t == h - 1 or ((t + 1) % self.ps.sync_every == 0 and not bool(alive.any())):
                break
            lg = ro.feed(tok, alive)
        return (self.ps.alpha - 1) * total.view(N, K, M)

    def token_step(self) -> None:
        """Algorithm 1: one token per row from its top-K candidates scored with rollouts."""
        ps, N = self.ps, self.N
        K = ps.n_candidates
        cand_lp, cand = torch.log_softmax(self.logits, -1).topk(K, -1)
        score = ps.alpha * cand_lp
        h = min(ps.horizon, self.T - self.L - 1)
        rows = torch.arange(N, device=cand.device)
        if h == 0:
            pick, lq = self.choose(score, None)
            self.emit(cand[rows, pick][:, None], cand_lp[rows, pick][:, None], lq, torch.ones_like(pick))
            return
        active = ~self.done
        br = _Branches.open(self, K, h)
        cand_logits = br.feed(cand.reshape(-1), active.repeat_interleave(K))
        live = active[:, None] & ~torch.isin(cand, self.eos)
        log_w = self.rollouts(br, torch.arange(K, device=cand.device).expand(N, K), cand_logits, h, live)
        pick, lq = self.choose(score, log_w)
        br.write_back(pick, 1)
        self.logits = cand_logits.index_select(0, rows * K + pick)
        self.emit(cand[rows, pick][:, None], cand_lp[rows, pick][:, None], lq, torch.ones_like(pick))

    def block_step(self) -> None:
        """Appendix variant: L proposed blocks at temperature 1/alpha, the K most likely distinct
        ones scored with rollouts after them."""
        ps, N = self.ps, self.N
        Lp, K = ps.n_proposals, ps.n_candidates
        b = min(ps.block_size, self.T - self.L)
        h = min(ps.horizon, self.T - self.L - b)
        fed = b if h > 0 else b - 1           # the last token is fed only when rollouts follow it
        br = _Branches.open(self, Lp, fed + max(h - 1, 0)) if fed > 0 else None
        alive = (~self.done).repeat_interleave(Lp)
        blocks = torch.full((N * Lp, b), -1, dtype=torch.int64, device=alive.device)
        tok_lp = torch.zeros(N * Lp, b, device=alive.device)
        length = torch.zeros(N * Lp, dtype=torch.int64, device=alive.device)
        lg = self.logits.repeat_interleave(Lp, 0)
        for j in range(b):
            tok, lp, _ = self.sample_tokens(lg, 1.0 / ps.alpha)
            blocks[:, j] = torch.where(alive, tok, -1)
            tok_lp[:, j] = torch.where(alive, lp, 0.0)
            length += alive.long()
            self.proposal_tokens += alive.sum()
            alive = alive & ~torch.isin(tok, self.eos)
            if j < fed:
                lg = br.feed(tok, alive)      # after the last token: the logits the rollouts start from
        view = blocks.view(N, Lp, b)
        same = (view[:, :, None, :] == view[:, None, :, :]).all(-1)
        earlier = torch.ones(Lp, Lp, dtype=torch.bool, device=same.device).tril(-1)
        repeated = (same & earlier).any(-1)                    # an earlier proposal is the same block
        score, top = torch.where(repeated, -math.inf, ps.alpha * tok_lp.sum(1).view(N, Lp)).topk(K, -1)
        log_w = None
        if h > 0:
            live = score.isfinite() & alive.view(N, Lp).gather(1, top)
            log_w = self.rollouts(br, top, lg, h, live)
        pick, lq = self.choose(score, log_w)
        chosen = top.gather(1, pick[:, None])[:, 0]
        rows = torch.arange(N, device=chosen.device) * Lp + chosen
        if h > 0:
            br.write_back(chosen, b)
            self.logits = lg.index_select(0, rows)
        self.emit(blocks[rows], tok_lp[rows], lq, length[rows])

    def emit(self, tok: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor, n: torch.Tensor) -> None:
        """Append each unfinished row's chosen ``n[b]`` tokens (``tok``/``lp`` ``[N, width]``, ``lq``:
        the decision's log-probability) and advance ``L`` by the width."""
        N, width = tok.shape
        rows = torch.arange(N, device=tok.device)[:, None]
        j = torch.arange(width, device=tok.device)[None, :]
        valid = (~self.done)[:, None] & (j < n[:, None])
        pos = self.P[:, None] + self.L + j
        self.tokens[rows, pos] = torch.where(valid, tok, self.tokens[rows, pos])
        g = self.L + j.expand(N, width)
        self.lp[rows, g] = torch.where(valid, lp, 0.0)
        self.lq[rows, g] = torch.where(valid & (j == 0), lq[:, None], 0.0)
        self.length += valid.sum(1)
        self.done |= (valid & torch.isin(tok, self.eos)).any(1)
        self.L += width
        self.done |= self.L >= self.T


def sample(ps, prompts: list, prompt_index: list, rng, thinking: Optional[list] = None) -> list:
    """Scalable power sampling of every prompt (one entry per chain) with the settings of
    ``ps`` (a :class:`~hybridfast.power.PowerSampler` with ``method="scalable"``; with its
    ``steer=``, ``thinking`` holds each entry's thinking prompt and every forward of the sampled
    model is the routed one); returns one :class:`~hybridfast.power.PowerResult` per entry and
    sets ``ps.last_stats``: token-forwards, output, rollout and proposal tokens, peak and copied
    K/V bytes (the batch's cache plus the candidate/proposal and rollout rows alive at once, the
    thinking router's included), seconds."""
    from .power import PowerResult
    t0 = time.perf_counter()
    run = _Run(ps, prompts, rng, thinking)
    run.run()
    length, toks, lp, lq, P = (x.cpu() for x in (run.length, run.tokens, run.lp, run.lq, run.P))
    out = []
    for b in range(run.N):
        n = int(length[b])
        ids = toks[b, int(P[b]): int(P[b]) + n].tolist()
        out.append(PowerResult(prompt_index[b], ids, ps.text(ids), lp[b, :n].tolist(), lq[b, :n].tolist()))
    stats = dict(token_forwards=int(run.forwards), output_tokens=int(length.sum()),
                 rollout_tokens=int(run.rollout_tokens), proposal_tokens=int(run.proposal_tokens),
                 peak_cache_bytes=run.peak_bytes, copied_cache_bytes=run.copied_bytes,
                 seconds=time.perf_counter() - t0, chains=run.N)
    for r in out:
        r.stats.update(stats)
    ps.last_stats = stats
    return out
