"""The decode loop: batched prompts of different lengths, static KV cache, per-row EOS,
greedy or temperature sampling through ``ops.sample_logprobs``, and no host synchronisation
inside a step (EOS is checked every ``sync_every`` steps, never per token).

    eng = Engine(model)                       # any transformers Llama/Qwen2-style causal LM
    out = eng.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)
    out.tokens[b][: out.lengths[b]]

Steering plugs in through ``steer``: a callable ``(h [B, R, d], step_info) -> h`` applied to the
residual stream entering ``steer_layer``; see :mod:`hybridfast.hybrid`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import ops
from .compiled import compile_options, compile_step, new_cache
from .model import DecoderModel, KVCache
from .ops.rng import RandomStream

__all__ = ["Engine", "Generation", "pad_prompts", "pad_id"]


@dataclass
class Generation:
    """Output of :meth:`Engine.generate`. Tensors are on the CPU."""
    tokens: torch.Tensor          #: [B, max_new_tokens] generated ids (EOS-padded after the end)
    lengths: torch.Tensor         #: [B] generated tokens per row, EOS included
    logp: torch.Tensor            #: [B, max_new_tokens] log p (temperature 1) of each token
    logq: torch.Tensor            #: [B, max_new_tokens] log-prob under the sampling distribution
    steps: int = 0                #: decode steps run
    token_forwards: int = 0       #: token positions pushed through the model (prefill + decode)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def sequences(self) -> list[list[int]]:
        return [self.tokens[b, : int(self.lengths[b])].tolist() for b in range(self.tokens.shape[0])]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to ``[B, S]``; returns ``(ids, lengths)``. Empty prompts raise."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_id, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
    return ids.to(device), torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None) if \
            getattr(model, "generation_config", None) is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def pad_id(eos: list[int]) -> int:
    """The id used for padding and for finished rows: the first EOS id when it is a real token."""
    return eos[0] if eos and eos[0] >= 0 else 0


class Engine:
    """Owns the decode loop over one model. See the module docstring."""

    def __init__(self, model, *, sync_every: int = 16, compile=False, attention: str = "sdpa"):
        self.hf = model
        self.m = DecoderModel(model, attention)
        self.sync_every = sync_every
        #: torch.compile options of the decode step (None: eager); see hybridfast.compiled
        self.compile_options = compile_options(compile, self.m.device)
        self.step = compile_step(self._step, self.compile_options)

    def new_cache(self, batch: int, capacity: int, **kw) -> KVCache:
        """A cache for ``capacity`` tokens (rounded up to the compile bucket when compiled)."""
        return new_cache(self.m, batch, capacity, self.compile_options, **kw)

    def span(self, cache: KVCache, used: int) -> int:
        """Cache slots a decode step attends over: the ``used`` ones eager, all when compiled
        (static shapes; the length mask hides the rest)."""
        return cache.kv[0].shape[2] if self.compile_options is not None else used

    def _step(self, tok: torch.Tensor, lengths: torch.Tensor, kv: list, scratch: int,
              span: int) -> torch.Tensor:
        """One plain decode step: feed ``tok [B]`` at each row's next position, advance
        ``lengths`` in place, return logits ``[B, V]`` (the function ``compile=`` compiles)."""
        m = self.m
        c = KVCache(kv, lengths, scratch)
        h = m.run(m.embed(tok[:, None]), m.decode_plan(c, 0, span), c, 0, m.n_layers)
        lengths.add_(1)
        return m.logits(h[:, 0])

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache, *,
                stop_layer: Optional[int] = None, capture_layer: Optional[int] = None,
                steer_layer: Optional[int] = None, steer: Optional[Callable] = None):
        """Write prompts into the cache; returns ``(h_last [B, d] or logits [B, V], captured)``.

        ``captured`` is the residual output of block ``capture_layer`` at each row's last
        prompt position. With ``stop_layer`` the blocks from ``stop_layer`` on are skipped (a
        truncated router). ``steer(h_last [B, 1, d]) -> h`` modifies the residual entering
        ``steer_layer`` at the last prompt position only.
        """
        m = self.m
        B, S = ids.shape
        span = cache.scratch + S
        plan = m.prefill_plan(lengths, S, cache, span)
        h = m.embed(ids)
        last = (lengths - 1)
        bidx = torch.arange(B, device=ids.device)
        stop = m.n_layers if stop_layer is None else stop_layer
        captured = None
        i = 0
        while i < stop:
            if steer is not None and i == steer_layer:
                hl = steer(h[bidx, last][:, None, :])[:, 0]
                h = h.clone()
                h[bidx, last] = hl
            h = m.block(i, h, plan, cache)
            if capture_layer is not None and i == capture_layer:
                captured = h[bidx, last]
            i += 1
        cache.lengths.copy_(lengths)
        if stop_layer is not None:
            return None, captured
        return m.logits(h[bidx, last]), captured

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 eos_token_id=None, pad_token_id: Optional[int] = None) -> Generation:
        """Generate for a batch of token-id prompts (lists or a list of 1-D tensors)."""
        t0 = time.perf_counter()
        m = self.m
        prompts = [list(map(int, p)) for p in prompts]
        eos = _eos_ids(self.hf, eos_token_id)
        pad = pad_token_id if pad_token_id is not None else pad_id(eos)
        ids, lengths = pad_prompts(prompts, pad, m.device)
        B = ids.shape[0]
        cache = self.new_cache(B, int(lengths.max()) + max_new_tokens)
        logits, _ = self.prefill(ids, lengths, cache)
        dec = Decoder(self, cache, eos, pad, temperature, top_k, generator)
        toks, lps, lqs = dec.run(logits, max_new_tokens, int(lengths.max()))
        out = dec.finish(toks, lps, lqs)
        out.token_forwards = int(lengths.sum()) + dec.forwards
        out.seconds = time.perf_counter() - t0
        return out


class Decoder:
    """The per-step loop shared by plain generation (and extended by the hybrid modes)."""

    def __init__(self, engine: Engine, cache: KVCache, eos: list[int], pad: int,
                 temperature: float, top_k, generator):
        self.e, self.m, self.cache = engine, engine.m, cache
        self.eos = torch.tensor(eos or [-1], dtype=torch.int64, device=self.m.device)
        self.pad, self.temperature, self.top_k = pad, temperature, top_k
        self.rng = RandomStream(generator, self.m.device) if temperature != 0 else None
        B = cache.lengths.shape[0]
        self.done = torch.zeros(B, dtype=torch.bool, device=self.m.device)
        self.n_gen = torch.zeros(B, dtype=torch.int64, device=self.m.device)
        self.forwards = 0

    def sample(self, logits):
        seed = self.rng.next_seed() if self.rng is not None else None
        return ops.sample_logprobs(logits, self.temperature, top_k=self.top_k, seed=seed,
                                   check_nan=False)

    def emit(self, tok, lp, lq):
        """Mask finished rows, update EOS state; returns the tokens to record/feed."""
        tok = torch.where(self.done, torch.full_like(tok, self.pad), tok)
        lp = torch.where(self.done, torch.zeros_like(lp), lp)
        lq = torch.where(self.done, torch.zeros_like(lq), lq)
        self.n_gen += (~self.done).long()
        self.done = self.done | torch.isin(tok, self.eos)
        return tok, lp, lq

    def step_forward(self, tok, span):
        """One decode step of the plain model: feed ``tok [B]``, return logits [B, V]."""
        c = self.cache
        self.forwards += tok.shape[0]
        return self.e.step(tok, c.lengths, c.kv, c.scratch, self.e.span(c, span))

    def run(self, logits, max_new_tokens, max_prompt):
        toks, lps, lqs = [], [], []
        for t in range(max_new_tokens):
            tok, lp, lq = self.emit(*self.sample(logits))
            toks.append(tok), lps.append(lp), lqs.append(lq)
            if t == max_new_tokens - 1:
                break
            if (t + 1) % self.e.sync_every == 0 and bool(self.done.all()):
                break
            span = self.cache.scratch + max_prompt + t + 1
            logits = self.step_forward(tok, span)
        return toks, lps, lqs

    def finish(self, toks, lps, lqs, total: Optional[int] = None) -> Generation:
        T = total or len(toks)
        B = self.done.shape[0]
        tokens = torch.full((B, T), self.pad, dtype=torch.int64)
        lp = torch.zeros(B, T)
        lq = torch.zeros(B, T)
        n = len(toks)
        tokens[:, :n] = torch.stack(toks, 1).cpu()
        lp[:, :n] = torch.stack(lps, 1).float().cpu()
        lq[:, :n] = torch.stack(lqs, 1).float().cpu()
        return Generation(tokens, self.n_gen.cpu(), lp, lq, steps=n)
