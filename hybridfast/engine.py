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
from typing import Callable, Iterator, Optional, Sequence

import torch

from . import ops
from .compiled import compile_options, compile_step, new_cache
from .model import DecoderModel, KVCache, capture
from .ops.rng import RandomStream
from .scheduler import Completion, Request, Scheduler

__all__ = ["Engine", "Generation", "PlainMode", "pad_prompts", "pad_id", "sample"]


@dataclass
class Generation:
    """Output of :meth:`Engine.generate`. Tensors are on the CPU."""
    tokens: torch.Tensor          #: [B, T] generated ids (EOS-padded after each row's end)
    lengths: torch.Tensor         #: [B] generated tokens per row, EOS included
    logp: torch.Tensor            #: [B, max_new_tokens] log p (temperature 1) of each token
    logq: torch.Tensor            #: [B, max_new_tokens] log-prob under the sampling distribution
    steps: int = 0                #: tokens chosen per row (the longest row's length)
    token_forwards: int = 0       #: token positions pushed through the model (prefill + decode)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def sequences(self) -> list[list[int]]:
        return [self.tokens[b, : int(self.lengths[b])].tolist() for b in range(self.tokens.shape[0])]

    @classmethod
    def from_completions(cls, done: list, pad: int) -> "Generation":
        """Pad the scheduler's completions (in prompt order) into ``[B, T]`` tensors."""
        T = max(len(c.tokens) for c in done)
        B = len(done)
        tokens = torch.full((B, T), pad, dtype=torch.int64)
        logp, logq = torch.zeros(B, T), torch.zeros(B, T)
        for b, c in enumerate(done):
            n = len(c.tokens)
            tokens[b, :n] = torch.tensor(c.tokens, dtype=torch.int64)
            logp[b, :n] = torch.tensor(c.fields["logp"])
            logq[b, :n] = torch.tensor(c.fields["logq"])
        return cls(tokens, torch.tensor([len(c.tokens) for c in done]), logp, logq)


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


def eos_ids(model, eos_token_id) -> list[int]:
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
        #: the scheduler's counts (:attr:`Scheduler.stats`) of the last stream or generate
        self.last_stats: dict = {}

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
        h = m.forward(tok[:, None], m.decode_plan(c, 0, span), c)
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
        at = (torch.arange(B, device=ids.device), lengths - 1)     # each row's last prompt position
        hooks, captured = {}, {}
        if steer is not None:
            hooks[steer_layer] = lambda h, p: (h.index_put(at, steer(h[at][:, None, :])[:, 0]), p)
        if capture_layer is not None:
            hooks[capture_layer + 1] = capture(captured, at)
        h = m.forward(ids, plan, cache, hooks, stop_layer)
        cache.lengths.copy_(lengths)
        if stop_layer is not None:
            return None, captured.get("h")
        return m.logits(h[at]), captured.get("h")

    def requests(self, prompts, max_new_tokens) -> list[Request]:
        """Scheduler requests for token-id prompts (lists or 1-D tensors)."""
        return [Request((p,), max_new_tokens, i) for i, p in enumerate(prompts)]

    def scheduler(self, rows: int, capacity: int, *, temperature: float = 0.0,
                  top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  eos_token_id=None, compact: bool = True) -> Scheduler:
        """A continuous-batching scheduler of plain decoding over ``rows`` cache rows of
        ``capacity`` tokens (see :mod:`hybridfast.scheduler`)."""
        eos = eos_ids(self.hf, eos_token_id)
        mode = PlainMode(self, temperature, top_k, generator, pad_id(eos))
        return Scheduler(mode, rows=rows, capacities=[capacity], eos=eos, pad=pad_id(eos),
                         sync_every=self.sync_every, compact=compact)

    def stream(self, prompts, max_new_tokens: int, *, rows: int, temperature: float = 0.0,
               top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
               eos_token_id=None) -> Iterator[list[Completion]]:
        """Decode token-id ``prompts`` ``rows`` at a time with continuous batching, yielding the
        completions (``index`` = prompt position) of each sync point that finished some."""
        prompts = [list(map(int, p)) for p in prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        reqs = self.requests(prompts, max_new_tokens)
        sched = self.scheduler(rows, max(map(len, prompts)) + max_new_tokens, temperature=temperature,
                               top_k=top_k, generator=generator, eos_token_id=eos_token_id,
                               compact=rows < len(prompts))
        yield from sched.groups(reqs)
        self.last_stats = sched.stats

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 eos_token_id=None, rows: Optional[int] = None) -> Generation:
        """Generate for token-id prompts (lists or 1-D tensors). By default every prompt gets a
        row (static batching); ``rows=N`` decodes them N at a time with continuous batching
        (a prompt starts as soon as a row frees; the batch shrinks as the queue drains). Greedy
        tokens are the same either way."""
        t0 = time.perf_counter()
        done = {c.index: c for group in self.stream(
            prompts, max_new_tokens, rows=rows or len(prompts), temperature=temperature, top_k=top_k,
            generator=generator, eos_token_id=eos_token_id) for c in group}
        out = Generation.from_completions([done[i] for i in range(len(done))],
                                         pad_id(eos_ids(self.hf, eos_token_id)))
        st = self.last_stats
        out.steps, out.extra = max(out.lengths.tolist()), st
        out.token_forwards = st["prefill_tokens"] + st["row_steps"]
        out.seconds = time.perf_counter() - t0
        return out


class PlainMode:
    """Plain decoding as a :class:`~hybridfast.scheduler.Mode`: logits in, a sampled (or greedy)
    token and its ``logp``/``logq`` out."""

    def __init__(self, engine: Engine, temperature: float, top_k, generator, pad: int):
        self.e, self.temperature, self.top_k, self.pad = engine, temperature, top_k, pad
        self.rng = RandomStream(generator, engine.m.device) if temperature != 0 else None

    def new_caches(self, rows, capacities):
        return [self.e.new_cache(rows, capacities[0])]

    def prefill(self, prompts, caches):
        ids, lengths = pad_prompts(prompts[0], self.pad, self.e.m.device)
        logits, _ = self.e.prefill(ids, lengths, caches[0])
        return (logits,)

    def choose(self, state):
        tok, lp, lq = sample(state[0], self.temperature, self.top_k, self.rng)
        return tok, dict(logp=lp, logq=lq)

    def step(self, tok, caches, spans):
        c = caches[0]
        return (self.e.step(tok, c.lengths, c.kv, c.scratch, self.e.span(c, spans[0])),)


def sample(logits, temperature: float, top_k, rng: Optional[RandomStream]):
    """``ops.sample_logprobs`` of ``logits`` with the next seed of ``rng`` (None: greedy)."""
    seed = rng.next_seed() if rng is not None else None
    return ops.sample_logprobs(logits, temperature, top_k=top_k, seed=seed, check_nan=False)
