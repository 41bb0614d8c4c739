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
gives the same chains for the same seed. Chains of all prompts (``n_chains`` per prompt) advance
in one batch; rows that are done idle (they re-feed their last token, rewriting identical KV).

``method="smc"`` — Power-SMC: ``n_particles`` per prompt decoded in one batch with the same
proposal, incremental log-weights ``alpha * lp - lq``, multinomial resampling (KV rows copied by
index) when the effective sample size falls below ``ess_threshold * n_particles``, optional
linear ramp of alpha over the first ``alpha_ramp`` tokens. Returns one particle per prompt drawn
from the final weights, plus the weights.

``method="scalable"`` — scalable power sampling (approximate; :mod:`hybridfast.scalable`): each
token (``variant="token"``) or block (``variant="block"``) is drawn from ``n_candidates``
candidates weighted by ``p^alpha`` times a future factor estimated with ``n_rollouts`` rollouts of
up to ``horizon`` tokens, with an optional jackknife bias correction.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import ops, scalable
from .compiled import bucketed, compile_options, compile_step, new_cache
from .engine import DecoderModel, _eos_ids, pad_id, pad_prompts
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
    (approximate). See the module docstring."""

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
            if method != "mh":
                raise NotImplementedError("steer= is supported with method='mh' only")
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
        self.eos = _eos_ids(model, eos_token_id)
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

    def prefill(self, cache, tokens, n_tokens, st=None, tcache=None):
        """Encode ``tokens[b, :n_tokens[b]]`` into ``cache`` from slot 0 (one parallel pass) and
        return the logits at each row's last position. With ``steer=`` the thinking model encodes
        its own prompt plus the same generated tokens (``st["tt"]``) up to ``sae_layer``, and every
        position from the last prompt position on is steered by ``route_steer`` (as it was when
        generated)."""
        m = self.m
        S = int(n_tokens.max())
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)
        plan = m.prefill_plan(n_tokens, S, cache, S)
        h = m.embed(tokens[:, :S])
        if self.steer is None:
            h = m.run(h, plan, cache, 0, m.n_layers)
            return m.logits(h[rows, (n_tokens - 1).clamp_min(0)])
        hm, mt = self.steer, self.steer.thinking.m
        gen_len = n_tokens - st["P"]
        tn = st["Pt"] + gen_len
        St = int(tn.max())
        xt = mt.run(mt.embed(st["tt"][:, :St]), mt.prefill_plan(tn, St, tcache, St), tcache, 0,
                    hm.sae_layer + 1)
        L = hm.steer_layer
        h = m.run(h, plan, cache, 0, L)
        j = torch.arange(S, device=tokens.device)[None, :]
        k = j - (st["P"][:, None] - 1)                    # offset from the last prompt position
        valid = (k >= 0) & (j < n_tokens[:, None])
        tj = (st["Pt"][:, None] - 1 + k).clamp(0, St - 1)
        x = xt[rows[:, None], tj]
        out, _ = hm.route(h.reshape(B * S, -1), x.reshape(B * S, -1), False)
        h = torch.where(valid[..., None], out.view_as(h), h)
        h = m.run(h, plan, cache, L, m.n_layers)
        return m.logits(h[rows, (n_tokens - 1).clamp_min(0)])

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
        m.run(m.embed(tokens[rows[:, None], pos]), m.plan(pos, slots, visible), cache, 0, m.n_layers)
        return int(n.sum())

    def _forward_one(self, cache, st, L, tcache=None):
        """Logits after feeding each row's last token (position ``P + L - 1``); steered when
        ``steer=`` is set (the thinking model reads the same token at its own position)."""
        if self.steer is None:
            return self._step(st["tokens"], st["P"], L, cache.lengths, cache.kv, cache.scratch)
        return self._step(st["tokens"], st["P"], L, cache.lengths, cache.kv, cache.scratch,
                          st["tt"], st["Pt"], tcache.lengths, tcache.kv)

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
            h = m.run(m.embed(tok[:, None]), m.decode_plan(cache, 0, tokens.shape[1]), cache, 0,
                      m.n_layers)
            return m.logits(h[:, 0])
        tlengths.copy_(Pt + L - 1)
        logits, _ = self.steer.routed_forward(tok, tt[rows, Pt + L - 1], cache,
                                              KVCache(tkv, tlengths, 0), tokens.shape[1],
                                              tt.shape[1])
        return logits

    def _decode(self, st, cache, L, cap, max_steps, rng, first_logits=None, tcache=None):
        """Extend rows of state ``st`` (tokens/lp/lq/eos) from gen length ``L`` until EOS or
        ``cap``. Returns ``(L, forwards)`` with forwards a device scalar."""
        P = st["P"]
        N = L.shape[0]
        rows = torch.arange(N, device=L.device)
        fw = torch.zeros((), dtype=torch.int64, device=L.device)
        temp = 1.0 / self.alpha
        eos = torch.tensor(self.eos or [-1], device=L.device)
        active = (~st["eos"]) & (L < cap)
        for t in range(max_steps):
            if first_logits is not None and t == 0:
                logits = first_logits
            else:
                logits = self._forward_one(cache, st, L, tcache)
                fw += active.sum()
            tok, lp, lq = self._sample(logits, temp, rng)
            idx = (P + L).clamp_max(st["tokens"].shape[1] - 1)
            gi = L.clamp_max(st["lp"].shape[1] - 1)
            st["tokens"][rows, idx] = torch.where(active, tok, st["tokens"][rows, idx])
            if "tt" in st:
                ti = (st["Pt"] + L).clamp_max(st["tt"].shape[1] - 1)
                st["tt"][rows, ti] = torch.where(active, tok, st["tt"][rows, ti])
            st["lp"][rows, gi] = torch.where(active, lp, st["lp"][rows, gi])
            st["lq"][rows, gi] = torch.where(active, lq, st["lq"][rows, gi])
            st["eos"] = st["eos"] | (active & torch.isin(tok, eos))
            L = L + active.long()
            active = active & ~st["eos"] & (L < cap)
            if (t + 1) % self.sync_every == 0 and not bool(active.any()):
                break
        return L, fw

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def sample(self, prompts, *, n_chains: int = 1, generator: Optional[torch.Generator] = None,
               thinking_prompts=None):
        """Power-sample every prompt (``n_chains`` independent chains each for MH; for SMC one
        selected particle per prompt and chain). With ``steer=``, ``thinking_prompts`` gives the
        thinking model's prompt per problem. Returns a list of :class:`PowerResult`."""
        pr = self._encode(prompts)
        rows = [i for i in range(len(pr)) for _ in range(n_chains)]
        tp = None
        if self.steer is not None:
            if thinking_prompts is None or len(thinking_prompts) != len(pr):
                raise ValueError("steer= needs one thinking prompt per prompt (thinking_prompts=)")
            tp = self.steer._encode(list(thinking_prompts), self.steer.tok_t)
            for i, p in enumerate(tp):
                if not p:
                    raise ValueError(f"thinking prompt {i} is empty")
            tp = [tp[i] for i in rows]
        rng = RandomStream(generator, self.m.device)
        if self.method == "scalable":
            return scalable.sample(self, [pr[i] for i in rows], rows, rng)
        if self.method == "smc":
            return self._smc([pr[i] for i in rows], rows, rng)
        return self._mh([pr[i] for i in rows], rows, rng, tp)

    # ------------------------------------------------------------------ MH
    def _mh(self, prompts, prompt_index, rng, thinking_prompts=None):
        t0 = time.perf_counter()
        m, dev = self.m, self.m.device
        N, T = len(prompts), self.max_new_tokens
        pad = pad_id(self.eos)
        ids, P = pad_prompts(prompts, pad, dev)
        width = bucketed(ids.shape[1] + T + 1, self.compile_options)
        cur = dict(P=P, tokens=torch.full((N, width), pad, dtype=torch.int64, device=dev),
                   lp=torch.zeros(N, T + 1, device=dev), lq=torch.zeros(N, T + 1, device=dev),
                   eos=torch.zeros(N, dtype=torch.bool, device=dev))
        cur["tokens"][:, : ids.shape[1]] = ids
        cache = new_cache(m, N, width, self.compile_options)
        in_place = self.reuse and self.reject == "reprefill"
        pcache = cache if in_place else new_cache(m, N, width, self.compile_options)
        tcache = tpcache = None
        if self.steer is not None:
            mt = self.steer.thinking.m
            tids, Pt = pad_prompts(thinking_prompts, pad, dev)
            twidth = bucketed(tids.shape[1] + T + 1, self.compile_options)
            cur["tt"] = torch.full((N, twidth), pad, dtype=torch.int64, device=dev)
            cur["tt"][:, : tids.shape[1]] = tids
            cur["Pt"] = Pt
            tcache = new_cache(mt, N, twidth, self.compile_options, layers=self.steer.sae_layer + 1)
            tpcache = new_cache(mt, N, twidth, self.compile_options, layers=self.steer.sae_layer + 1)
        caches = [(cache, pcache)] + ([(tcache, tpcache)] if tcache is not None else [])
        L = torch.zeros(N, dtype=torch.int64, device=dev)
        fw = torch.zeros((), dtype=torch.int64, device=dev)
        decoded = torch.zeros((), dtype=torch.int64, device=dev)
        n_prop = torch.zeros(N, dtype=torch.int64, device=dev)
        n_acc = torch.zeros(N, dtype=torch.int64, device=dev)
        trace = []
        j = torch.arange(T + 1, device=dev)[None, :]
        nblocks = math.ceil(T / self.block_size)
        prev_cap = 0
        for k in range(nblocks):
            cap = min((k + 1) * self.block_size, T)
            live = ~cur["eos"]            # chains whose state ended in EOS after a block stop
            # ---- extend every live chain by up to one block
            L0 = L.clone()
            if self.reuse and k > 0:
                L, f = self._decode(cur, cache, L, cap, cap - prev_cap, rng, tcache=tcache)
            else:  # first block (prompt prefill), or recompute: encode prompt + prefix
                first = self.prefill(cache, cur["tokens"], P + L, cur, tcache)
                fw += torch.where(live, P + L, 0).sum()
                L, f = self._decode(cur, cache, L, cap, cap - prev_cap, rng, first_logits=first,
                                    tcache=tcache)
            fw += f
            decoded += (L - L0).sum()
            prev_cap = cap
            # ---- n_mcmc Metropolis-Hastings steps on the whole generated sequence
            for _ in range(self.n_mcmc):
                u = rng.uniform(N)
                mi = torch.minimum((u * L).long(), (L - 1).clamp_min(0))
                mi = torch.where(live, mi, L)
                prop = dict(P=P, tokens=cur["tokens"].clone(), lp=cur["lp"].clone(),
                            lq=cur["lq"].clone(), eos=cur["eos"] & ~live)
                if "tt" in cur:
                    prop["tt"], prop["Pt"] = cur["tt"].clone(), cur["Pt"]
                pcap = torch.where(live, torch.full_like(L, cap), L)
                max_steps = int((pcap - mi).max())
                if self.reuse:
                    if not in_place:
                        for c, pc in caches:
                            for a, b in zip(pc.kv, c.kv):
                                a.copy_(b)
                    # re-feeds the token before m (its logits predict position m)
                    Lp, f = self._decode(prop, pcache, mi, pcap, max_steps, rng, tcache=tpcache)
                else:
                    first = self.prefill(pcache, prop["tokens"], P + mi, prop, tpcache)
                    fw += torch.where(live, P + mi, 0).sum()
                    Lp, f = self._decode(prop, pcache, mi, pcap, max_steps, rng, first_logits=first,
                                         tcache=tpcache)
                fw += f
                decoded += (Lp - mi).sum()
                # ---- acceptance over the whole suffixes of both states
                in_prop = (j >= mi[:, None]) & (j < Lp[:, None])
                cur_end = torch.minimum(L, Lp) if self.official else L
                in_cur = (j >= mi[:, None]) & (j < cur_end[:, None])
                slp = (prop["lp"] * in_prop).sum(1) - (cur["lp"] * in_cur).sum(1)
                slq = (cur["lq"] * in_cur).sum(1) - (prop["lq"] * in_prop).sum(1)
                logA = self.alpha * slp + slq
                if not self.official:   # Hastings term: m is uniform over a different count
                    logA = logA + torch.log(L.clamp_min(1).float()) - torch.log(Lp.clamp_min(1).float())
                v = rng.uniform(N)
                acc = live & (torch.log(v) < logA)
                n_prop += live.long()
                n_acc += acc.long()
                trace.append((mi, L, Lp, acc))
                for key in ("tokens", "lp", "lq", "eos") + (("tt",) if "tt" in cur else ()):
                    a = acc.view(-1, *([1] * (cur[key].ndim - 1)))
                    cur[key] = torch.where(a, prop[key], cur[key])
                if in_place:
                    # the proposal overwrote the tail in place: re-encode the kept old suffix of
                    # rejected chains (tokens fed at P+m-1 .. P+L-2) in one parallel pass
                    rej = live & ~acc
                    Lnew = torch.where(acc, Lp, L)
                    start = torch.where(rej, P + mi - 1, P + Lnew - 1).clamp_min(0)
                    fw += self._extend(cache, cur["tokens"], start, torch.where(rej, L - mi, 0))
                L = torch.where(acc, Lp, L)
                if self.reuse and not in_place:
                    a = acc.view(-1, 1, 1, 1)
                    for c, pc in caches:
                        for x, y in zip(c.kv, pc.kv):
                            torch.where(a, y, x, out=x)
            if bool(cur["eos"].all()):
                break
        Lc = L.cpu()
        toks = cur["tokens"].cpu()
        lp, lq = cur["lp"].cpu(), cur["lq"].cpu()
        dt = time.perf_counter() - t0
        out = []
        for b in range(N):
            n = int(Lc[b])
            gen_ids = toks[b, int(P[b]): int(P[b]) + n].tolist()
            out.append(PowerResult(prompt_index[b], gen_ids, self.text(gen_ids), lp[b, :n].tolist(), lq[b, :n].tolist(),
                                   dict(acceptance_rate=float(n_acc[b]) / max(1, int(n_prop[b])),
                                        proposals=int(n_prop[b]))))
        stats = dict(decoded_tokens=int(decoded), token_forwards=int(fw), seconds=dt, chains=N,
                     trace=[tuple(t.cpu() for t in x) for x in trace])
        for r in out:
            r.stats.update({k: v for k, v in stats.items() if k != "trace"})
        self.last_stats = stats
        return out

    # ------------------------------------------------------------------ SMC
    def _smc(self, prompts, prompt_index, rng):
        """Power-SMC (see module docstring). ``prompts`` holds one entry per selected particle."""
        t0 = time.perf_counter()
        m, dev = self.m, self.m.device
        G, Np, T = len(prompts), self.n_particles, self.max_new_tokens
        N = G * Np
        pad = pad_id(self.eos)
        ids, P = pad_prompts([p for p in prompts for _ in range(Np)], pad, dev)
        width = bucketed(ids.shape[1] + T + 1, self.compile_options)
        tokens = torch.full((N, width), pad, dtype=torch.int64, device=dev)
        tokens[:, : ids.shape[1]] = ids
        lpb = torch.zeros(N, T, device=dev)
        lqb = torch.zeros(N, T, device=dev)
        L = torch.zeros(N, dtype=torch.int64, device=dev)
        done = torch.zeros(N, dtype=torch.bool, device=dev)
        logw = torch.zeros(N, dtype=torch.float64, device=dev)
        cum_lp = torch.zeros(N, dtype=torch.float64, device=dev)
        eos = torch.tensor(self.eos or [-1], device=dev)
        rows = torch.arange(N, device=dev)
        cache = new_cache(m, N, width, self.compile_options)
        logits = self.prefill(cache, tokens, P)
        fw = int(P.sum())
        n_resample = 0
        a_prev = None
        for t in range(T):
            a_t = self.alpha if self.alpha_ramp <= 0 else \
                min(self.alpha, 1.0 + (self.alpha - 1.0) * t / self.alpha_ramp)
            if t > 0:
                logits = self._forward_one(cache, dict(P=P, tokens=tokens), L)
                fw += int(N)
            tok, lp, lq = self._sample(logits, 1.0 / a_t, rng)
            active = ~done
            if a_prev is not None and a_t != a_prev:   # the target's exponent moved: reweight the past
                logw += (a_t - a_prev) * cum_lp
            a_prev = a_t
            logw += torch.where(active, a_t * lp.double() - lq.double(), torch.zeros_like(logw))
            tokens[rows, P + L] = torch.where(active, tok, tokens[rows, P + L])
            lpb[rows, L.clamp_max(T - 1)] = torch.where(active, lp, lpb[rows, L.clamp_max(T - 1)])
            lqb[rows, L.clamp_max(T - 1)] = torch.where(active, lq, lqb[rows, L.clamp_max(T - 1)])
            cum_lp += torch.where(active, lp.double(), torch.zeros_like(cum_lp))
            L = L + active.long()
            done = done | (active & torch.isin(tok, eos)) | (L >= T)
            # ---- resample groups whose effective sample size fell below the threshold
            w = logw.view(G, Np)
            ess = torch.exp(2 * torch.logsumexp(w, 1) - torch.logsumexp(2 * w, 1))
            need = ess < self.ess_threshold * Np
            if bool(need.any()) and t < T - 1:
                n_resample += int(need.sum())
                probs = torch.softmax(w, 1).float()
                draw = rng.categorical(probs, Np)
                ident = torch.arange(Np, device=dev)[None, :].expand(G, Np)
                src = (torch.where(need[:, None], draw, ident)
                       + torch.arange(G, device=dev)[:, None] * Np).reshape(-1)
                tokens, lpb, lqb, L, done, cum_lp = (x.index_select(0, src) for x in
                                                     (tokens, lpb, lqb, L, done, cum_lp))
                for x in cache.kv:
                    x.copy_(x.index_select(0, src))
                logw = torch.where(need[:, None], torch.logsumexp(w, 1, keepdim=True) - math.log(Np),
                                   w).reshape(-1)
            if (t + 1) % self.sync_every == 0 and bool(done.all()):
                break
        w = logw.view(G, Np)
        norm_w = torch.softmax(w, 1)
        pick = rng.categorical(norm_w, 1)[:, 0]
        sel = torch.arange(G, device=dev) * Np + pick
        dt = time.perf_counter() - t0
        out = []
        Lc, toks = L.cpu(), tokens.cpu()
        for g in range(G):
            r = int(sel[g])
            n = int(Lc[r])
            gen_ids = toks[r, int(P[r]): int(P[r]) + n].tolist()
            out.append(PowerResult(prompt_index[g], gen_ids, self.text(gen_ids), lpb[r, :n].tolist(), lqb[r, :n].tolist(),
                                   dict(weights=norm_w[g].cpu().tolist(), selected=int(pick[g]),
                                        particle_ids=[toks[g * Np + i, int(P[r]): int(P[r]) + int(Lc[g * Np + i])].tolist()
                                                   for i in range(Np)],
                                        ess=float(torch.exp(2 * torch.logsumexp(w[g], 0) - torch.logsumexp(2 * w[g], 0))))))
        self.last_stats = dict(token_forwards=fw, decoded_tokens=int(L.sum()), seconds=dt,
                               resampling_events=n_resample, particles=N)
        for r in out:
            r.stats.update(self.last_stats)
        return out
