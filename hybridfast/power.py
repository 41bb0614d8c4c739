"""Power sampling: sample from p^alpha of a causal LM (DESIGN.md section 2).

``method="mh"`` — block-wise Metropolis-Hastings, exact: for each block, every chain is extended
by up to ``block_size`` tokens from the proposal (temperature ``1/alpha``, optional top-k); then
``n_mcmc`` times an index ``m`` is drawn uniformly over the chain's generated positions, the
suffix from ``m`` is resampled with the proposal until EOS or the block's end, and accepted with

    log A = alpha * (sum lp' - sum lp) + (sum lq - sum lq') + log(L_cur / L_prop)

over the whole suffixes of both states (``lp``: log p at temperature 1, ``lq``: log-prob under
the proposal actually used, both from the generating step's logits). The last term is the
Hastings correction for drawing ``m`` among a different number of positions.

``official=True`` reproduces the official code instead (biased; for comparison only): top-k 50
unless ``top_k`` is given, the current suffix truncated to the proposal's length, no Hastings
length term.

Engine: the prompt is prefilled once per chain. A proposal copies the chain's cache rows into a
proposal cache (memory copy, no forward), re-feeds the token before ``m`` and decodes only the
suffix; on accept the proposal's rows are copied back, on reject nothing is recomputed.
``reuse=False`` re-encodes prompt + prefix for every proposal (what the official code spends) and
gives the same chains for the same seed. A chain's state is a :class:`~hybridfast.chains.Chains`
row; the proposal is a clone, accepting is one masked write of the chains and of the cache rows.

By default chains of all prompts (``n_chains`` per prompt) advance in one batch in lockstep
rounds (every chain extends by one block, then takes ``n_mcmc`` MH steps together); rows that are
done idle (they re-feed their last token, rewriting identical KV), and every row waits for the
longest suffix of each step. ``rows=R`` (:meth:`PowerSampler.stream`; KV reuse with
``reject="keep"``) keeps at most ``R`` chains in the cache and steps each row on its own: a
row's phase (its chain's extension by one block, or one MH step) ends at EOS or its cap, is
settled at the next sync point (accept or reject, one cache row copied), and the row begins its
next phase, or, when its chain is done, takes the next queued chain (prefilled into that row).
Every chain runs exactly the per-row MH above (its own caps and Hastings term). Both count decode
steps, idle row-steps (rows stepped while their chain had nothing to do) and host
synchronisations in ``last_stats``.

``method="smc"`` — Power-SMC: ``n_particles`` per prompt decoded in one batch with the same
proposal, incremental log-weights ``alpha * lp - lq``, multinomial resampling (KV rows copied by
index) when the effective sample size falls below ``ess_threshold * n_particles``, optional
linear ramp of alpha over the first ``alpha_ramp`` tokens. Returns one particle per prompt drawn
from the final weights, plus the weights. ``steer=`` as with MH (resampling copies the thinking
router's cache rows with the particles'). ``rows=R`` (:meth:`PowerSampler.stream`) keeps at most
``R`` particle groups in the cache: a group whose particles have all ended (checked every
``sync_every`` steps) yields its particle and the next problem's particles are prefilled into its
rows; the default runs every group at once.

``method="scalable"`` — scalable power sampling (approximate; :mod:`hybridfast.scalable`): each
token (``variant="token"``) or block (``variant="block"``) is drawn from ``n_candidates``
candidates weighted by ``p^alpha`` times a future factor estimated with ``n_rollouts`` rollouts of
up to ``horizon`` tokens, with an optional jackknife bias correction; ``steer=`` as with MH.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import ops, scalable
from .compiled import bucketed, compile_options, compile_step, new_cache
from .chains import Chains
from .engine import DecoderModel, eos_ids, pad_id
from .model import KVCache
from .ops.rng import RandomStream

__all__ = ["PowerSampler", "PowerResult", "expected_mh_token_forwards", "METHODS"]

METHODS = ("mh", "smc", "scalable")


@dataclass
class PowerResult:
    """One chain (MH) or the selected particle (SMC)."""
    prompt_index: int
    ids: list
    text: Optional[str]
    logp: list
    logq: list
    stats: dict = field(default_factory=dict)


def expected_mh_token_forwards(max_new_tokens: int, block_size: int, n_mcmc: int,
                               prompt_len: int = 0, reuse: bool = True) -> float:
    """Expected token-forwards of one MH chain that never emits EOS.

    Block ``k`` (1-based, cap ``c_k = min(k B, T)``) extends by ``c_k - c_{k-1}`` tokens and runs
    ``n_mcmc`` proposals with ``m ~ U{0..c_k-1}`` decoding ``c_k - m`` tokens each (mean
    ``(c_k + 1) / 2``); with reuse each new token costs one forward, plus the prompt prefill
    (whose last position yields the first token). With recomputation (the official code) every
    generate call re-encodes prompt + prefix, so each call costs exactly ``P + c_k - 1``
    token-forwards whatever ``m`` is. Decoded tokens = the reuse count minus ``P - 1``.
    """
    total, prev = 0.0, 0
    nblocks = math.ceil(max_new_tokens / block_size)
    for k in range(1, nblocks + 1):
        cap = min(k * block_size, max_new_tokens)
        if reuse:
            total += (cap - prev) + n_mcmc * (cap + 1) / 2
        else:  # every generate call encodes P + context and decodes up to cap: P + cap - 1
            total += (1 + n_mcmc) * (prompt_len + cap - 1)
        prev = cap
    return total + (prompt_len - 1 if reuse else 0)


class PowerSampler:
    """Sample from p^alpha with block-wise MH (exact), Power-SMC, or scalable power sampling
    (approximate). See the module docstring.

    ``steer=`` (every method): a :class:`~hybridfast.hybrid.HybridModel` in
    routed mode whose base model is ``model``. Every forward of the sampled model is then the
    routed one (the thinking model's router reads the same tokens after its own prompt, given by
    :meth:`sample`'s ``thinking_prompts``), so the target is p^alpha of the steered model."""

    def __init__(self, model, *, alpha: float = 4.0, block_size: int = 192, n_mcmc: int = 10,
                 max_new_tokens: int = 3072, top_k: Optional[int] = None, method: str = "mh",
                 reuse: bool = True, reject: str = "keep", official: bool = False,
                 n_particles: int = 16,
                 ess_threshold: float = 0.5, alpha_ramp: int = 0, variant: str = "token",
                 n_candidates: int = 8, n_rollouts: int = 8, horizon: int = 192, n_proposals: int = 32,
                 jackknife: bool = True, prefix_kv: str = "shared", tokenizer=None,
                 eos_token_id=None, steer=None, sync_every: int = 16, compile=False,
                 attention: str = "sdpa"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not alpha >= 1.0:
            raise ValueError(f"alpha must be >= 1 (p^alpha sharpens p), got {alpha}")
        if block_size < 1 or max_new_tokens < 1 or n_mcmc < 0:
            raise ValueError(f"need block_size >= 1, max_new_tokens >= 1, n_mcmc >= 0; got "
                             f"{block_size}, {max_new_tokens}, {n_mcmc}")
        if not 0 < ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold}")
        if steer is not None:
            if getattr(steer, "mode", None) != "routed":
                raise ValueError("steer= takes a HybridModel in routed mode (its steering is applied "
                                 "inside every forward pass of the sampled model)")
            if steer.base.hf is not model:
                raise ValueError("steer=: the HybridModel's base model must be the sampled model")
        self.steer = steer
        if reject not in ("keep", "reprefill"):
            raise ValueError(f"reject must be 'keep' or 'reprefill', got {reject!r}")
        if reject == "reprefill" and steer is not None:
            raise NotImplementedError("reject='reprefill' is not supported with steer=")
        self.reject = reject
        self.hf = model
        self.m = DecoderModel(model, attention)
        self.alpha, self.block_size, self.n_mcmc = float(alpha), int(block_size), int(n_mcmc)
        self.max_new_tokens, self.method = int(max_new_tokens), method
        self.official = bool(official)
        self.top_k = (50 if official else None) if top_k is None else int(top_k)
        self.reuse = bool(reuse)
        self.n_particles, self.ess_threshold, self.alpha_ramp = int(n_particles), float(ess_threshold), int(alpha_ramp)
        if method == "scalable":
            scalable.check_settings(variant=variant, n_candidates=n_candidates, n_rollouts=n_rollouts,
                                    horizon=horizon, n_proposals=n_proposals, jackknife=jackknife,
                                    prefix_kv=prefix_kv, vocab_size=self.m.vocab_size)
            if compile or official or top_k is not None:
                raise NotImplementedError("method='scalable' takes no compile=, official= or top_k= (its "
                                          "candidates, proposals and rollouts use the full vocabulary)")
        self.variant, self.n_candidates, self.n_rollouts = variant, int(n_candidates), int(n_rollouts)
        self.horizon, self.n_proposals, self.jackknife = int(horizon), int(n_proposals), bool(jackknife)
        self.prefix_kv = prefix_kv
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, eos_token_id)
        self.sync_every = sync_every
        #: torch.compile options of the decode step (None: eager); see hybridfast.compiled
        self.compile_options = compile_options(compile, self.m.device)
        self._step = compile_step(self._forward_one_eager, self.compile_options)

    # ------------------------------------------------------------------ helpers
    def _encode(self, prompts):
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if len(prompts) and isinstance(prompts[0], str):
            if self.tokenizer is None:
                raise ValueError("string prompts need tokenizer=")
            prompts = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(out):
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        return out

    def text(self, ids: list) -> Optional[str]:
        """The decoded text of generated ``ids`` (None without a tokenizer)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else None

    def _sample(self, logits, temperature, rng):
        return ops.sample_logprobs(logits, temperature, top_k=self.top_k, seed=rng.next_seed(),
                                   check_nan=False)

    def prefill(self, cache, tokens, n_tokens, ch: Optional[Chains] = None, tcache=None):
        """Encode ``tokens[b, :n_tokens[b]]`` into ``cache`` from slot 0 (one parallel pass) and
        return the logits at each row's last position. With ``steer=`` (``ch``: the chains whose
        tokens these are) the thinking model encodes its own prompt plus the same generated tokens
        (``ch.tt``) up to ``sae_layer``, and every
        position from the last prompt position on is steered by ``route_steer`` (as it was when
        generated)."""
        m = self.m
        S = int(n_tokens.max())
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)
        plan = m.prefill_plan(n_tokens, S, cache, S)
        last = (rows, (n_tokens - 1).clamp_min(0))
        if self.steer is None:
            return m.logits(m.forward(tokens[:, :S], plan, cache)[last])
        hm, mt = self.steer, self.steer.thinking.m
        gen_len = n_tokens - ch.P
        tn = ch.Pt + gen_len
        St = int(tn.max())
        xt = mt.forward(ch.tt[:, :St], mt.prefill_plan(tn, St, tcache, St), tcache, stop=hm.sae_layer + 1)
        j = torch.arange(S, device=tokens.device)[None, :]
        k = j - (ch.P[:, None] - 1)                    # offset from the last prompt position
        valid = (k >= 0) & (j < n_tokens[:, None])
        x = xt[rows[:, None], (ch.Pt[:, None] - 1 + k).clamp(0, St - 1)]

        def steer(h, plan):
            out, _ = hm.route(h.reshape(B * S, -1), x.reshape(B * S, -1), False)
            return torch.where(valid[..., None], out.view_as(h), h), plan
        return m.logits(m.forward(tokens[:, :S], plan, cache, {hm.steer_layer: steer})[last])

    def _extend(self, cache, tokens, start, n):
        """Re-encode ``tokens[b, start_b : start_b + n_b]`` into ``cache`` in one parallel pass
        (rows with ``n_b = 0`` write only beyond their valid slots). Returns token-forwards."""
        S = int(n.max())
        if S == 0:
            return 0
        m = self.m
        width = tokens.shape[1]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        pos = (start[:, None] + torch.arange(S, device=tokens.device)[None, :]).clamp_max(width - 1)
        slots = pos + cache.scratch
        j = torch.arange(width + cache.scratch, device=tokens.device)[None, None, :]
        visible = (j >= cache.scratch) & (j <= slots[:, :, None])
        m.forward(tokens[rows[:, None], pos], m.plan(pos, slots, visible), cache)
        return int(n.sum())

    def _forward_one(self, cache, ch: Chains, tcache=None):
        """Logits after feeding each row's last token (position ``P + L - 1``); steered when
        ``steer=`` is set (the thinking model reads the same token at its own position)."""
        if self.steer is None:
            return self._step(ch.tokens, ch.P, ch.lengths, cache.lengths, cache.kv, cache.scratch)
        return self._step(ch.tokens, ch.P, ch.lengths, cache.lengths, cache.kv, cache.scratch,
                          ch.tt, ch.Pt, tcache.lengths, tcache.kv)

    def _forward_one_eager(self, tokens, P, L, lengths, kv, scratch: int, tt=None, Pt=None,
                           tlengths=None, tkv=None):
        """The decode step ``compile=`` compiles (static shapes: it attends over the whole
        token buffer's width; the length mask hides the rest)."""
        m = self.m
        rows = torch.arange(L.shape[0], device=L.device)
        cache = KVCache(kv, lengths, scratch)
        lengths.copy_(P + L - 1)
        tok = tokens[rows, P + L - 1]
        if self.steer is None:
            return m.logits(m.forward(tok[:, None], m.decode_plan(cache, 0, tokens.shape[1]), cache)[:, 0])
        tlengths.copy_(Pt + L - 1)
        logits, _ = self.steer.routed_forward(tok, tt[rows, Pt + L - 1], cache,
                                              KVCache(tkv, tlengths, 0), tokens.shape[1],
                                              tt.shape[1])
        return logits

    def _decode(self, ch: Chains, cache, cap, max_steps: int, rng, counts: "_Counts", first=None,
                fresh=None, tcache=None):
        """Extend the rows of ``ch`` with the proposal until EOS or ``cap [N]`` (at most
        ``max_steps`` tokens). ``first``: logits of every row's first token (from a prefill), or
        with ``fresh`` only of the rows where it is true (the others take a decode step first)."""
        temp = 1.0 / self.alpha
        eos = torch.tensor(self.eos or [-1], device=cap.device)
        active = ~ch.eos & (ch.lengths < cap)
        for t in range(max_steps):
            if t == 0 and first is not None and fresh is None:
                logits = first
            else:
                logits = self._forward_one(cache, ch, tcache)
                counts.step(active & ~fresh if t == 0 and first is not None else active, active)
                if t == 0 and first is not None:
                    logits = torch.where(fresh[:, None], first, logits)
            tok, lp, lq = self._sample(logits, temp, rng)
            ch.append_(tok, lp, lq, active)
            ch.eos = ch.eos | (active & torch.isin(tok, eos))
            active = active & ~ch.eos & (ch.lengths < cap)
            if (t + 1) % self.sync_every == 0:
                counts.syncs += 1
                if not bool(active.any()):
                    break

    # ------------------------------------------------------------------ public
    def _chains(self, prompts, n_chains: int, thinking_prompts):
        """Per chain: its prompt, its prompt's index, and its thinking prompt (``steer=``)."""
        pr = self._encode(prompts)
        if not pr:
            raise ValueError("no prompts given")
        index = [i for i in range(len(pr)) for _ in range(n_chains)]
        tp = None
        if self.steer is not None:
            if thinking_prompts is None or len(thinking_prompts) != len(pr):
                raise ValueError("steer= needs one thinking prompt per prompt (thinking_prompts=)")
            tp = self.steer.encode_prompts(list(thinking_prompts), self.steer.tok_t)
            for i, p in enumerate(tp):
                if not p:
                    raise ValueError(f"thinking prompt {i} is empty")
            tp = [tp[i] for i in index]
        return [pr[i] for i in index], index, tp

    @torch.inference_mode()
    def sample(self, prompts, *, n_chains: int = 1, generator: Optional[torch.Generator] = None,
               thinking_prompts=None, rows: Optional[int] = None):
        """Power-sample every prompt (``n_chains`` independent chains each for MH; for SMC one
        selected particle per prompt and chain). With ``steer=``, ``thinking_prompts`` gives the
        thinking model's prompt per problem. MH and SMC: ``rows=R`` keeps at most ``R`` chains
        (SMC: particle groups) in the cache with continuous batching (see :meth:`stream`); by
        default every chain gets its rows.
        Returns a list of :class:`PowerResult`, chains of a prompt together, in prompt order."""
        if self.method == "scalable":
            if rows is not None:
                raise NotImplementedError("rows= (continuous batching) is supported with method='mh' or 'smc'")
            chain_prompts, index, tp = self._chains(prompts, n_chains, thinking_prompts)
            return scalable.sample(self, chain_prompts, index, RandomStream(generator, self.m.device), tp)
        out = {}
        for group in self._stream(prompts, n_chains, rows, generator, thinking_prompts):
            out.update(group)
        totals = {k: v for k, v in self.last_stats.items() if k != "trace"}
        for r in out.values():
            r.stats.update(totals)
        return [out[i] for i in range(len(out))]

    @torch.inference_mode()
    def stream(self, prompts, *, rows: int, n_chains: int = 1,
               generator: Optional[torch.Generator] = None, thinking_prompts=None):
        """Continuous batching. MH: at most ``rows`` chains live in the cache, each row stepped
        on its own (module docstring); when a chain ends, the next queued one is prefilled into its
        row. SMC: at most ``rows`` particle groups; when every particle of a group has ended, its
        particle is drawn and the next group is prefilled into its rows. Yields the results that
        ended at each sync point, in the order they end (``prompt_index`` says whose);
        ``last_stats`` is set once the stream is exhausted. Every chain runs the algorithm of the
        static batch, but its random draws depend on the schedule: same prompts, ``rows`` and
        seed, same output."""
        if self.method not in ("mh", "smc"):
            raise NotImplementedError("stream() is MH or SMC with continuous batching (method='mh' or 'smc')")
        for group in self._stream(prompts, n_chains, rows, generator, thinking_prompts):
            yield list(group.values())

    def _stream(self, prompts, n_chains, rows, generator, thinking_prompts):
        if rows is not None and int(rows) < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if rows is not None and self.method == "mh" and not (self.reuse and self.reject == "keep"):
            raise NotImplementedError("rows= (continuous batching) needs KV reuse with reject='keep' "
                                      f"(got reuse={self.reuse}, reject={self.reject!r})")
        chain_prompts, index, tp = self._chains(prompts, n_chains, thinking_prompts)
        rng = RandomStream(generator, self.m.device)
        if self.method == "smc":
            return self._smc(chain_prompts, index, rng, tp, rows)
        if rows is None:
            return self._mh(chain_prompts, index, rng, tp)
        return self._mh_async(chain_prompts, index, rng, tp, min(int(rows), len(chain_prompts)))

    # ------------------------------------------------------------------ MH
    def _mh(self, prompts, prompt_index, rng, thinking=None):
        """Run MH chains for ``prompts``, one cache row each, in lockstep rounds; yields
        ``{chain: PowerResult}`` for the chains of each round that finished some."""
        t0 = time.perf_counter()
        run = self._mh_rows(prompts, thinking, len(prompts))
        self._admit(run, list(range(run.R)), list(range(run.R)), prompts, thinking)
        while any(c >= 0 for c in run.chain):
            done = self._round_done(run, self._round(run, rng))
            if done:
                yield self._leave(run, done, prompt_index)
        self.last_stats = run.stats(time.perf_counter() - t0, len(prompts))

    def _mh_async(self, prompts, prompt_index, rng, thinking, R: int):
        """Run MH chains for ``prompts`` in ``R`` cache rows with asynchronous per-row steps;
        yields ``{chain: PowerResult}`` as chains end.

        Every row is always in a *phase*: the extension of its chain by one block (a proposal
        from the chain's end, always accepted) or one MH step (a proposal from a uniform index
        ``m``). All rows decode their phase's proposal together in the proposal cache. When a
        row's phase ends (EOS or the block's cap) it alone is settled at the next sync point:
        accepted or rejected, its cache row copied one way (``settle_rows_``), and its next phase
        begun; a chain that finished its last MH step of its last block (or of a block ending
        in EOS) leaves and the next queued chain is prefilled into its row. Between sync points
        the host decodes exactly until the earliest cap any row can reach (at most
        ``sync_every`` steps), so rows idle only after an early EOS or when no chain is left."""
        t0 = time.perf_counter()
        run = self._mh_rows(prompts, thinking, R)
        run.phase = _Phases.zeros(R, self.m.device)
        queue = deque(range(len(prompts)))
        at, cap = [0] * R, [0] * R      # host view: each row's proposal length and cap
        while True:
            free = [r for r, c in enumerate(run.chain) if c < 0][: len(queue)]
            if free:
                self._admit(run, free, [queue.popleft() for _ in free], prompts, thinking)
                self._begin(run, free, [0] * len(free), at, cap)
            live = [r for r, c in enumerate(run.chain) if c >= 0]
            if not live:
                break
            n = min(self.sync_every, min(cap[r] - at[r] for r in live))
            self._decode(run.prop, run.caches[0][1], run.phase.cap, n, rng, run.counts, run.first,
                         run.fresh, run.tpcache)
            run.first = run.fresh = None
            lengths, eos = torch.stack([run.prop.lengths, run.prop.eos.long()]).tolist()
            run.counts.syncs += 1
            at[:] = lengths
            ended = [r for r in live if eos[r] or at[r] >= cap[r]]
            if ended:
                done = self._settle(run, ended, rng, at, cap)
                if done:
                    yield self._leave(run, done, prompt_index)
        self.last_stats = run.stats(time.perf_counter() - t0, len(prompts))

    def _begin(self, run: "_MHRows", rows: list, starts: list, at: list, cap: list) -> None:
        """Begin the next phase of the chains in ``rows`` (their proposal rows hold their state)
        from ``starts``: the extension of block ``run.block[r]`` (from the chain's length) when
        ``run.k[r] == 0``, else an MH step (from ``m``); both run to the block's cap. ``at`` and
        ``cap`` (host lists) are updated."""
        for r, s in zip(rows, starts):
            at[r], cap[r] = s, min((run.block[r] + 1) * self.block_size, self.max_new_tokens)
        dev = self.m.device
        idx = torch.tensor(rows, device=dev)
        start = torch.tensor(starts, device=dev)
        run.phase.begin_(idx, start, torch.tensor([cap[r] for r in rows], device=dev),
                         torch.tensor([run.k[r] == 0 for r in rows], device=dev))
        run.prop.lengths = run.prop.lengths.index_copy(0, idx, start)
        run.prop.eos = run.prop.eos.index_fill(0, idx, False)

    def _settle(self, run: "_MHRows", rows: list, rng, at: list, cap: list) -> list:
        """End the phases of ``rows``: extensions are accepted, MH steps accepted with
        probability ``min(1, A)``; both the chain and the proposal rows (state and caches) take
        the outcome. Returns the rows whose chain is done; the others begin their next phase
        (its ``m``, uniform over the chain's generated positions, is drawn here so that one host
        synchronisation brings back the outcome and the next start)."""
        cur, prop, ph = run.cur, run.prop, run.phase
        idx = torch.tensor(rows, device=cur.eos.device)
        logA = self._log_accept(cur, prop, ph.start)
        acc = (ph.extension | (torch.log(rng.uniform(run.R)) < logA)).index_select(0, idx)
        run.counts.decoded += (prop.lengths - ph.start).index_select(0, idx).sum()
        cur.settle_(idx, acc, prop)
        for c, pc in run.caches:
            c.settle_rows_(idx, acc, pc)
        L = cur.lengths.index_select(0, idx)
        m = torch.minimum((rng.uniform(len(rows)) * L).long(), (L - 1).clamp_min(0))
        acc, eos, L, m = torch.stack([acc.long(), cur.eos.index_select(0, idx).long(), L, m]).tolist()
        run.counts.syncs += 1
        last = math.ceil(self.max_new_tokens / self.block_size) - 1
        done, more, starts = [], [], []
        for i, r in enumerate(rows):
            if run.k[r] > 0:
                run.accepted[r].append(bool(acc[i]))
            run.k[r] = (run.k[r] + 1) % (self.n_mcmc + 1)
            if run.k[r] == 0 and (eos[i] or run.block[r] == last):
                done.append(r)
                continue
            if run.k[r] == 0:
                run.block[r] += 1
            more.append(r)
            starts.append(L[i] if run.k[r] == 0 else m[i])
        if more:
            self._begin(run, more, starts, at, cap)
        if done:
            prop.eos = prop.eos.index_fill(0, torch.tensor(done, device=idx.device), True)
        return done

    def _mh_rows(self, prompts, thinking, R: int) -> "_MHRows":
        """Caches for ``R`` rows (and the proposal's; with ``steer=`` the thinking model's too)."""
        m, T, opts = self.m, self.max_new_tokens, self.compile_options
        width = bucketed(max(map(len, prompts)) + T + 1, opts)
        cache = new_cache(m, R, width, opts)
        in_place = self.reuse and self.reject == "reprefill"
        caches = [(cache, cache if in_place else new_cache(m, R, width, opts))]
        twidth = 0
        if self.steer is not None:
            mt, n = self.steer.thinking.m, self.steer.sae_layer + 1
            twidth = bucketed(max(map(len, thinking)) + T + 1, opts)
            caches.append(tuple(new_cache(mt, R, twidth, opts, layers=n) for _ in range(2)))
        return _MHRows(caches, width, twidth, pad_id(self.eos), R, _Counts.zeros(m.device))

    def _admit(self, run: "_MHRows", rows: list, chains: list, prompts, thinking) -> None:
        """Start ``chains`` in the free ``rows``: their state, and with KV reuse the prefill of
        their prompts (the logits of their first token are kept for the next decode step)."""
        dev = self.m.device
        new = Chains.from_prompts([prompts[c] for c in chains], pad=run.pad, n_gen=self.max_new_tokens + 1,
                                  width=run.width, device=dev, twidth=run.twidth,
                                  thinking=None if thinking is None else [thinking[c] for c in chains])
        for r, c in zip(rows, chains):
            run.chain[r], run.block[r], run.k[r], run.accepted[r] = c, 0, 0, []
        idx = torch.tensor(rows, device=dev)
        if run.cur is None:
            run.cur = new
        else:
            run.cur.write_(idx, new)
        if self.reuse:
            self._prefill_rows(run, idx, new)
        if run.phase is not None:      # asynchronous steps: the proposal rows start as copies
            if run.prop is None:
                run.prop = run.cur.clone()
            run.cur.settle_(idx, torch.zeros_like(idx, dtype=torch.bool), run.prop)
            for c, pc in run.caches:
                c.settle_rows_(idx, torch.zeros_like(idx, dtype=torch.bool), pc)

    def _prefill_rows(self, run: "_MHRows", idx, new: Chains) -> None:
        """Prefill the prompts of ``new`` (in rows ``idx``) into the chains' caches."""
        run.first, run.fresh = self._prefill_into([c for c, _ in run.caches], idx, new, run.cur, run.width, run.twidth)
        run.counts.fw += new.P.sum()

    def _prefill_into(self, caches: list, idx, new: Chains, every: Chains, width: int, twidth: int):
        """Prefill the prompts of ``new`` into rows ``idx`` of ``caches`` (the model's, then the
        thinking router's with ``steer=``): when ``idx`` is every row, in place from ``every``
        (the chains of all rows), else into fresh caches whose rows are copied in. Returns the
        logits of each row's first token and which rows they are for (None: every row)."""
        N = caches[0].kv[0].shape[0]
        tcache = caches[1] if len(caches) > 1 else None
        if len(idx) == N:
            return self.prefill(caches[0], every.tokens, every.P, every, tcache), None
        opts, n = self.compile_options, len(idx)
        sub = [new_cache(self.m, n, width, opts)]
        if tcache is not None:
            sub.append(new_cache(self.steer.thinking.m, n, twidth, opts, layers=len(tcache.kv)))
        logits = self.prefill(sub[0], new.tokens, new.P, new, sub[1] if tcache is not None else None)
        for c, sc in zip(caches, sub):
            c.write_rows_(idx, sc)
        first = logits.new_zeros(N, logits.shape[1]).index_copy_(0, idx, logits)
        return first, torch.zeros(N, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)

    def _round(self, run: "_MHRows", rng) -> list:
        """One round: every live chain extends by up to one block to its own cap, then
        ``n_mcmc`` MH steps. Returns the acceptance flags ``[R]`` of each step."""
        B, T = self.block_size, self.max_new_tokens
        live = ~run.cur.eos            # chains in rows (those that ended have left)
        cap = torch.tensor([min((b + 1) * B, T) for b in run.block], device=live.device)
        max_steps = max(min((b + 1) * B, T) - min(b * B, T)
                        for b, c in zip(run.block, run.chain) if c >= 0)
        self._extend_block(run, live, cap, max_steps, rng)
        return [self._mh_step(run, live, cap, rng) for _ in range(self.n_mcmc)]

    def _extend_block(self, run: "_MHRows", live, cap, max_steps: int, rng) -> None:
        cur, cache = run.cur, run.caches[0][0]
        L0, first, fresh = cur.lengths, run.first, run.fresh
        if not self.reuse:  # recompute: encode prompt + prefix of every row
            first, fresh = self.prefill(cache, cur.tokens, cur.P + cur.lengths, cur, run.tcache), None
            run.counts.fw += torch.where(live, cur.P + cur.lengths, 0).sum()
        self._decode(cur, cache, cap, max_steps, rng, run.counts, first, fresh, run.tcache)
        run.counts.decoded += (cur.lengths - L0).sum()
        run.first = run.fresh = None

    def _mh_step(self, run: "_MHRows", live, cap, rng):
        """One Metropolis-Hastings step of every live chain (index ``m`` uniform over its
        generated positions, suffix resampled up to its cap). Returns the acceptances."""
        cur = run.cur
        L = cur.lengths.clone()        # cur is written in place on accept; the trace keeps L
        u = rng.uniform(run.R)
        mi = torch.where(live, torch.minimum((u * L).long(), (L - 1).clamp_min(0)), L)
        prop = cur.clone()
        prop.eos, prop.lengths = cur.eos & ~live, mi
        self._propose(run, prop, live, torch.where(live, cap, L), rng)
        run.counts.decoded += (prop.lengths - mi).sum()
        acc = live & (torch.log(rng.uniform(run.R)) < self._log_accept(cur, prop, mi))
        run.trace.append((mi, L, prop.lengths, acc))
        self._apply(run, prop, live, mi, acc)
        return acc

    def _propose(self, run: "_MHRows", prop: Chains, live, pcap, rng) -> None:
        """Resample each live chain's suffix from ``m = prop.lengths`` up to ``pcap``."""
        (cache, pcache), tpcache = run.caches[0], run.tpcache
        mi = prop.lengths
        max_steps = int((pcap - mi).max())
        run.counts.syncs += 1
        if not self.reuse:
            first = self.prefill(pcache, prop.tokens, prop.P + mi, prop, tpcache)
            run.counts.fw += torch.where(live, prop.P + mi, 0).sum()
            self._decode(prop, pcache, pcap, max_steps, rng, run.counts, first, tcache=tpcache)
            return
        if pcache is not cache:
            for c, pc in run.caches:
                pc.copy_(c)
        # re-feeds the token before m (its logits predict position m)
        self._decode(prop, pcache, pcap, max_steps, rng, run.counts, tcache=tpcache)

    def _log_accept(self, cur: Chains, prop: Chains, mi):
        """log A over the whole suffixes of both states (module docstring)."""
        L, Lp = cur.lengths, prop.lengths
        j = torch.arange(cur.lp.shape[1], device=L.device)[None, :]
        in_prop = (j >= mi[:, None]) & (j < Lp[:, None])
        cur_end = torch.minimum(L, Lp) if self.official else L
        in_cur = (j >= mi[:, None]) & (j < cur_end[:, None])
        slp = (prop.lp * in_prop).sum(1) - (cur.lp * in_cur).sum(1)
        slq = (cur.lq * in_cur).sum(1) - (prop.lq * in_prop).sum(1)
        logA = self.alpha * slp + slq
        if not self.official:   # Hastings term: m is uniform over a different count
            logA = logA + torch.log(L.clamp_min(1).float()) - torch.log(Lp.clamp_min(1).float())
        return logA

    def _apply(self, run: "_MHRows", prop: Chains, live, mi, acc) -> None:
        """Accepted chains become their proposal; their cache rows follow (copied back from the
        proposal cache, or with ``reject="reprefill"`` the rejected ones re-encode their tail)."""
        cur, (cache, pcache) = run.cur, run.caches[0]
        if pcache is not cache:
            cur.write_(acc, prop)
            if self.reuse:
                for c, pc in run.caches:
                    c.where_rows_(acc, pc)
            return
        # the proposal overwrote the tail in place: re-encode the kept old suffix of rejected
        # chains (tokens fed at P+m-1 .. P+L-2) in one parallel pass
        rej = live & ~acc
        L = cur.lengths
        start = torch.where(rej, cur.P + mi - 1, cur.P + torch.where(acc, prop.lengths, L) - 1)
        n = torch.where(rej, L - mi, 0)
        cur.write_(acc, prop)
        run.counts.fw += self._extend(cache, cur.tokens, start.clamp_min(0), n)

    def _round_done(self, run: "_MHRows", accs: list) -> list:
        """After a round: record each chain's MH flags; returns the rows whose chain ended (EOS,
        or its last block done), advancing the others to their next block."""
        eos = run.cur.eos.tolist()
        flags = torch.stack(accs, 1).tolist() if accs else [[] for _ in run.chain]
        run.counts.syncs += 1 + bool(accs)
        last = math.ceil(self.max_new_tokens / self.block_size) - 1
        done = []
        for r, c in enumerate(run.chain):
            if c < 0:
                continue
            run.accepted[r] += flags[r]
            if eos[r] or run.block[r] == last:
                done.append(r)
            else:
                run.block[r] += 1
        return done

    def _leave(self, run: "_MHRows", rows: list, prompt_index) -> dict:
        """The results of the chains in ``rows``, which leave (their rows free, idle until
        refilled: marked EOS)."""
        cur = run.cur
        idx = torch.tensor(rows, device=cur.eos.device)
        toks, P, L, lp, lq = (x.index_select(0, idx).cpu() for x in (cur.tokens, cur.P, cur.lengths, cur.lp, cur.lq))
        cur.eos.index_fill_(0, idx, True)
        out = {}
        for i, r in enumerate(rows):
            n, p, acc = int(L[i]), int(P[i]), run.accepted[r]
            ids = toks[i, p: p + n].tolist()
            out[run.chain[r]] = PowerResult(prompt_index[run.chain[r]], ids, self.text(ids), lp[i, :n].tolist(),
                                            lq[i, :n].tolist(), dict(acceptance_rate=sum(acc) / max(1, len(acc)),
                                                                     proposals=len(acc), accepted=acc))
            run.chain[r] = -1
        return out

    # ------------------------------------------------------------------ SMC
    def _smc(self, prompts, prompt_index, rng, thinking=None, rows=None):
        """Power-SMC (see module docstring). ``prompts`` holds one entry per selected particle
        (a group of ``n_particles`` rows; ``thinking``: its thinking prompt, with ``steer=``).
        ``rows=R`` keeps at most ``R`` groups in the cache: when every particle of a group has
        ended (checked every ``sync_every`` steps, or when the host knows a group reached
        ``max_new_tokens``) and others wait, its particle is drawn and the next group is
        prefilled into its rows. Yields ``{group: PowerResult}`` as groups finish."""
        t0 = time.perf_counter()
        G, Np, T = len(prompts), self.n_particles, self.max_new_tokens
        run = self._smc_rows(prompts, thinking, G if rows is None else min(int(rows), G))
        queue, age = deque(range(G)), [0] * run.R      # host: steps each slot's group has taken
        while True:
            free = [s for s, g in enumerate(run.group) if g < 0][: len(queue)]
            if free:
                self._smc_admit(run, free, [queue.popleft() for _ in free], prompts, thinking)
                for s in free:
                    age[s] = 0
            live = [s for s, g in enumerate(run.group) if g >= 0]
            if not live:
                break
            pending = [s for s in live if age[s] < T]      # groups at T wait for the others' end
            n = min([self.sync_every] + [T - age[s] for s in pending]) if pending else 0
            for i in range(n):
                self._smc_step(run, rng, age[live[0]] + i)
            for s in pending:
                age[s] += n
            done = run.ch.eos.view(run.R, Np).all(1).tolist()
            run.counts.syncs += 1
            ended = [s for s in live if done[s] or age[s] >= T]
            if ended and (queue or len(ended) == len(live)):
                yield self._smc_leave(run, ended, prompt_index, rng)
        self.last_stats = dict(token_forwards=int(run.counts.fw), decoded_tokens=int(run.counts.decoded),
                               seconds=time.perf_counter() - t0, resampling_events=int(run.resampled), particles=G * Np,
                               rows=run.R * Np, row_steps=run.counts.steps * run.R * Np,
                               idle_row_steps=int(run.counts.idle), host_syncs=run.counts.syncs)

    def _smc_rows(self, prompts, thinking, R: int) -> "_SMCRows":
        """The caches and particles of ``R`` group slots (``n_particles`` rows each)."""
        dev, Np, T, opts = self.m.device, self.n_particles, self.max_new_tokens, self.compile_options
        if R < len(prompts) and self.alpha_ramp > 0:
            raise NotImplementedError("rows= (continuous batching) with alpha_ramp > 0: groups at "
                                      "different steps would need different proposal temperatures")
        width = bucketed(max(map(len, prompts)) + T + 1, opts)
        twidth = 0 if thinking is None else bucketed(max(map(len, thinking)) + T + 1, opts)
        caches = [new_cache(self.m, R * Np, width, opts)]
        if thinking is not None:
            caches.append(new_cache(self.steer.thinking.m, R * Np, twidth, opts, layers=self.steer.sae_layer + 1))
        zeros = lambda: torch.zeros(R * Np, dtype=torch.float64, device=dev)   # noqa: E731
        return _SMCRows(caches, width, twidth, R, zeros(), zeros(), torch.zeros(R, dtype=torch.int64, device=dev),
                        torch.tensor(self.eos or [-1], device=dev), _Counts.zeros(dev))

    def _smc_admit(self, run: "_SMCRows", slots: list, groups: list, prompts, thinking) -> None:
        """Start ``groups`` in the free ``slots``: fresh particles, zero weights, their prompts
        prefilled into the slots' rows (the first token's logits kept for the next step)."""
        dev, Np = self.m.device, self.n_particles
        rows = [s * Np + i for s in slots for i in range(Np)]
        per_particle = lambda xs: [xs[g] for g in groups for _ in range(Np)]   # noqa: E731
        new = Chains.from_prompts(per_particle(prompts), pad=pad_id(self.eos), n_gen=self.max_new_tokens,
                                  width=run.width, device=dev, twidth=run.twidth,
                                  thinking=None if thinking is None else per_particle(thinking))
        for s, g in zip(slots, groups):
            run.group[s] = g
        idx, sidx = torch.tensor(rows, device=dev), torch.tensor(slots, device=dev)
        run.logw.index_fill_(0, idx, 0.0)
        run.cum_lp.index_fill_(0, idx, 0.0)
        run.age.index_fill_(0, sidx, 0)
        if run.ch is None:
            run.ch = new
        else:
            run.ch.write_(idx, new)
        run.first, run.fresh = self._prefill_into(run.caches, idx, new, run.ch, run.width, run.twidth)
        run.counts.fw += new.P.sum()

    def _smc_step(self, run: "_SMCRows", rng, t: int) -> None:
        """One token for every particle: proposal at temperature ``1/alpha`` (with ``alpha_ramp``,
        the exponent of step ``t``, which every group shares then), incremental weights,
        resampling of the groups whose ESS fell (not at a group's last step)."""
        ch, caches, T = run.ch, run.caches, self.max_new_tokens
        a_t = self.alpha if self.alpha_ramp <= 0 else min(self.alpha, 1.0 + (self.alpha - 1.0) * t / self.alpha_ramp)
        active = ~ch.eos
        if run.first is not None and run.fresh is None:      # every row just prefilled
            logits, fed = run.first, torch.zeros_like(active)
        else:
            logits = self._forward_one(caches[0], ch, caches[1] if len(caches) > 1 else None)
            fed = torch.ones_like(active) if run.fresh is None else ~run.fresh
            if run.first is not None:
                logits = torch.where(run.fresh[:, None], run.first, logits)
        run.first = run.fresh = None
        run.counts.step(fed, active)
        tok, lp, lq = self._sample(logits, 1.0 / a_t, rng)
        if run.a_prev is not None and a_t != run.a_prev:   # the target's exponent moved: reweight the past
            run.logw += (a_t - run.a_prev) * run.cum_lp
        run.a_prev = a_t
        run.logw += torch.where(active, a_t * lp.double() - lq.double(), torch.zeros_like(run.logw))
        ch.append_(tok, lp, lq, active)
        run.cum_lp += torch.where(active, lp.double(), torch.zeros_like(run.cum_lp))
        ch.eos = ch.eos | (active & torch.isin(tok, run.eos)) | (ch.lengths >= T)
        run.age += 1
        last = run.age >= T                    # no resampling at a group's last step
        run.ch, run.cum_lp, run.logw, k = self._resample(ch, caches, run.cum_lp, run.logw, rng, last)
        run.resampled += k
        run.counts.syncs += 1                  # whether any group resamples is read on the host

    def _smc_leave(self, run: "_SMCRows", slots: list, prompt_index, rng) -> dict:
        """Draw the selected particle of the groups in ``slots`` and free the slots (their rows
        marked ended, weights reset)."""
        Np, dev = self.n_particles, self.m.device
        rows = torch.tensor([s * Np + i for s in slots for i in range(Np)], device=dev)
        ch = run.ch.select(rows)
        w = run.logw.index_select(0, rows)
        if run.a_prev is not None and run.a_prev != self.alpha:   # a ramp cut short: reweight to p^alpha
            w = w + (self.alpha - run.a_prev) * run.cum_lp.index_select(0, rows)
        w = w.view(len(slots), Np)
        run.counts.decoded += ch.lengths.sum()          # the final particles' lengths
        out = self._smc_results(ch, w, [prompt_index[run.group[s]] for s in slots], rng)
        run.ch.eos = run.ch.eos.index_fill(0, rows, True)
        run.logw.index_fill_(0, rows, 0.0)
        res = {}
        for s, r in zip(slots, out):
            res[run.group[s]] = r
            run.group[s] = -1
        return res

    def _resample(self, ch: Chains, caches, cum_lp, logw, rng, last):
        """Multinomial resampling of the groups whose effective sample size fell below the
        threshold, except where ``last [G]`` (particles and their KV rows in ``caches`` copied
        by index). Returns the new particles, ``cum_lp``, ``logw`` and how many groups were
        resampled (a device tensor: reading it would be a second host sync)."""
        Np = self.n_particles
        w = logw.view(-1, Np)
        G, dev = w.shape[0], w.device
        ess = torch.exp(2 * torch.logsumexp(w, 1) - torch.logsumexp(2 * w, 1))
        need = (ess < self.ess_threshold * Np) & ~last
        if not bool(need.any()):
            return ch, cum_lp, logw, 0
        draw = rng.categorical(torch.softmax(w, 1).float(), Np)
        ident = torch.arange(Np, device=dev)[None, :].expand(G, Np)
        src = (torch.where(need[:, None], draw, ident) + torch.arange(G, device=dev)[:, None] * Np).reshape(-1)
        for cache in caches:
            cache.copy_rows_(torch.arange(G * Np, device=dev), src)
        logw = torch.where(need[:, None], torch.logsumexp(w, 1, keepdim=True) - math.log(Np), w).reshape(-1)
        return ch.select(src), cum_lp.index_select(0, src), logw, need.sum()

    def _smc_results(self, ch: Chains, w, prompt_index, rng) -> list:
        """One particle per group drawn from the final weights ``w [G, Np]``, with the weights."""
        G, Np = w.shape
        norm_w = torch.softmax(w, 1)
        pick = rng.categorical(norm_w, 1)[:, 0]
        L, toks, P = ch.lengths.cpu(), ch.tokens.cpu(), ch.P.cpu()
        gen = lambda r: toks[r, int(P[r]): int(P[r]) + int(L[r])]  # noqa: E731
        out = []
        for g in range(G):
            r = g * Np + int(pick[g])
            n = int(L[r])
            gen_ids = gen(r).tolist()
            out.append(PowerResult(prompt_index[g], gen_ids, self.text(gen_ids), ch.lp[r, :n].tolist(),
                                   ch.lq[r, :n].tolist(),
                                   dict(weights=norm_w[g].cpu().tolist(), selected=int(pick[g]),
                                        particle_ids=[gen(g * Np + i).tolist() for i in range(Np)],
                                        ess=float(torch.exp(2 * torch.logsumexp(w[g], 0)
                                                            - torch.logsumexp(2 * w[g], 0))))))
        return out


@dataclass
class _Counts:
    """Work done by one MH call: token-forwards, decoded tokens, idle row-steps (device scalars,
    never synchronised per step), decode steps and host synchronisations."""
    fw: torch.Tensor
    decoded: torch.Tensor
    idle: torch.Tensor
    steps: int = 0
    syncs: int = 0

    @classmethod
    def zeros(cls, device) -> "_Counts":
        return cls(*(torch.zeros((), dtype=torch.int64, device=device) for _ in range(3)))

    def step(self, forwarded, active) -> None:
        """One decode step over every row: ``forwarded`` rows count as token-forwards, rows not
        ``active`` (their chain had nothing to do) as idle row-steps."""
        self.fw += forwarded.sum()
        self.idle += (~active).sum()
        self.steps += 1


@dataclass
class _Phases:
    """The phase each row's proposal is in (asynchronous MH): where it started (``m``; the
    chain's length for an extension), the cap it decodes to, and whether it is an extension."""
    start: torch.Tensor
    cap: torch.Tensor
    extension: torch.Tensor

    @classmethod
    def zeros(cls, R: int, device) -> "_Phases":
        z = torch.zeros(R, dtype=torch.int64, device=device)
        return cls(z, z.clone(), torch.zeros(R, dtype=torch.bool, device=device))

    def begin_(self, rows, start, cap, extension) -> None:
        self.start.index_copy_(0, rows, start)
        self.cap.index_copy_(0, rows, cap)
        self.extension.index_copy_(0, rows, extension)


@dataclass
class _SMCRows:
    """The cache rows of one SMC call: ``R`` group slots of ``Np`` particle rows each."""
    caches: list          #: [cache] plus the thinking router's with steer=
    width: int
    twidth: int
    R: int
    logw: torch.Tensor    #: [R Np] float64 log-weights
    cum_lp: torch.Tensor  #: [R Np] float64 sum of log p so far (alpha_ramp reweighting)
    age: torch.Tensor     #: [R] steps each slot's group has taken
    eos: torch.Tensor     #: the EOS ids
    counts: _Counts
    ch: Optional[Chains] = None
    group: list = None    #: group in each slot (-1: free)
    first: Optional[torch.Tensor] = None   #: first-token logits of rows prefilled since the last step
    fresh: Optional[torch.Tensor] = None   #: those rows (None with first: every row)
    a_prev: Optional[float] = None
    resampled: object = 0   #: groups resampled so far (int, or a device tensor once any was)

    def __post_init__(self):
        self.group = [-1] * self.R


@dataclass
class _MHRows:
    """The cache rows of one MH call: the chains in them, their caches, host bookkeeping."""
    caches: list          #: [(cache, proposal cache)], plus the thinking model's pair with steer=
    width: int
    twidth: int
    pad: int
    R: int
    counts: _Counts
    cur: Optional[Chains] = None
    chain: list = None    #: chain index in each row (-1: free)
    block: list = None    #: block index of each row's chain
    k: list = None        #: asynchronous steps: phase of each row's chain in its block (0: extension)
    accepted: list = None  #: per row: acceptance flag of each MH step its chain took
    first: Optional[torch.Tensor] = None   #: first-token logits of rows prefilled since the last decode step
    fresh: Optional[torch.Tensor] = None   #: [R] bool: those rows (None with first: every row)
    trace: list = field(default_factory=list)
    prop: Optional[Chains] = None          #: asynchronous steps: the proposal of every row
    phase: Optional[_Phases] = None        #: asynchronous steps: each row's phase

    def __post_init__(self):
        self.chain, self.block, self.k = [-1] * self.R, [0] * self.R, [0] * self.R
        self.accepted = [[] for _ in range(self.R)]

    @property
    def tcache(self):
        return self.caches[1][0] if len(self.caches) > 1 else None

    @property
    def tpcache(self):
        return self.caches[1][1] if len(self.caches) > 1 else None

    def stats(self, seconds: float, chains: int) -> dict:
        c = self.counts
        return dict(decoded_tokens=int(c.decoded), token_forwards=int(c.fw), seconds=seconds, chains=chains,
                    rows=self.R, row_steps=c.steps * self.R, idle_row_steps=int(c.idle), host_syncs=c.syncs,
                    trace=[tuple(t.cpu() for t in x) for x in self.trace])
