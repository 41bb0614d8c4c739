"""Continuous batching over a static KV cache: the one decode loop of every generation mode.

A :class:`Scheduler` owns ``rows`` cache rows. Requests wait in a queue; each is admitted into a
free row (prefilled into that row only), decoded in lockstep with the others, and its row is
freed as soon as it ends (EOS or its own ``max_new_tokens``), so the next request starts there
while the rest keep going. ``Engine.generate`` and ``HybridModel.generate`` are the special case
"all requests admitted at step 0" (rows = batch), so static and continuous batching share this
one loop, and a request's greedy tokens do not depend on which row it got or who shared its batch.

What a generation mode contributes is a :class:`Mode`: its caches, its prefill (returning the
per-row *state* the first token is chosen from, e.g. logits), how it chooses a token from that
state, and its decode step (the function ``compile=`` compiles). The scheduler owns everything
else: the queue, row bookkeeping, EOS and per-request token limits, and host synchronisation,
which happens only every ``sync_every`` steps or when the host already knows a row has reached
its token limit (never per token). Between syncs a finished row keeps stepping with its cache
length frozen; those row-steps are counted as idle (:attr:`Scheduler.stats`).

    sched = Scheduler(mode, rows=8, capacities=[capacity], eos=[2], pad=2)
    for c in sched.run(requests):           # completions in the order they finish
        print(c.index, c.tokens)

Sampling noise is keyed by (global step, row), so with sampling the tokens of a request depend on
the schedule (same requests, rows and seed: same tokens); greedy tokens do not.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

import torch

from .model import KVCache

__all__ = ["Request", "Completion", "Mode", "Scheduler"]

State = tuple   # per-row tensors, batch first (e.g. (logits [R, V],))


@dataclass
class Request:
    """One generation: a prompt per cache of the mode (plain: one; hybrid: base, thinking)."""
    prompts: tuple
    max_new_tokens: int
    index: int = 0                     #: the caller's id, returned in the completion

    def __post_init__(self):
        self.prompts = tuple([int(t) for t in p] for p in self.prompts)
        for p in self.prompts:
            if not p:
                raise ValueError(f"prompt {self.index} is empty: every prompt needs at least one token")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"request {self.index}: max_new_tokens must be >= 1, "
                             f"got {self.max_new_tokens}")
        self.max_new_tokens = int(self.max_new_tokens)


@dataclass
class Completion:
    """A finished (or, in :class:`Update`, growing) request: generated ids, EOS included when
    reached, and the mode's per-token fields (e.g. ``logp``, ``category``)."""
    index: int
    tokens: list
    fields: dict = field(default_factory=dict)
    finished: bool = True


class Mode(Protocol):
    """A generation mode as the scheduler drives it (see the module docstring)."""

    def new_caches(self, rows: int, capacities: Sequence[int]) -> list[KVCache]:
        """Zeroed caches for ``rows`` rows; ``capacities[i]`` tokens for cache ``i``."""

    def prefill(self, prompts: Sequence[Sequence[list]], caches: list[KVCache]) -> State:
        """Write ``prompts[i]`` (the prompts of cache ``i``, one per row) into rows ``0..n-1`` of
        ``caches``; return the state of those rows."""

    def choose(self, state: State) -> tuple[torch.Tensor, dict]:
        """The next token of every row ``[R]`` and per-token fields ``{name: [R]}``."""

    def step(self, tok: torch.Tensor, caches: list[KVCache], spans: Sequence[int]) -> State:
        """Feed ``tok [R]``; advance every cache length by one; return the new state.
        ``spans[i]``: cache ``i``'s slots in use after this token (eager steps attend over
        those only)."""


@dataclass
class _Row:
    """Host bookkeeping of one occupied cache row."""
    req: Request
    admitted: int          #: decode forwards run before admission
    tokens: list = field(default_factory=list)
    fields: dict = field(default_factory=dict)


class Scheduler:
    """Continuous batching of :class:`Request` s over ``rows`` cache rows driven by ``mode``.

    ``capacities[i]``: tokens cache ``i`` holds per row (prompt + generated); a request that
    does not fit is refused at :meth:`submit`. ``compact=True``: once the queue is empty and at
    most half the rows are busy, the batch shrinks to the busy rows (rounded up to a power of
    two, so a compiled step sees at most log2(rows) batch shapes); this bounds the idle
    row-steps of the drain, while rows finish at different times.
    """

    @torch.inference_mode()
    def __init__(self, mode: Mode, *, rows: int, capacities: Sequence[int], eos: Sequence[int],
                 pad: int, sync_every: int = 16, compact: bool = False):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.mode, self.rows, self.pad, self.sync_every = mode, rows, pad, sync_every
        self.compact = compact
        self.capacities = [int(c) for c in capacities]
        self.caches = mode.new_caches(rows, self.capacities)
        dev = self.caches[0].lengths.device
        self.device = dev
        self.eos = torch.tensor(list(eos) or [-1], dtype=torch.int64, device=dev)
        self.queue: deque[Request] = deque()
        self.slots: list[_Row | None] = [None] * rows
        self.state: State | None = None
        self.tok = torch.full((rows,), pad, dtype=torch.int64, device=dev)
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)     # empty rows count as done
        self.n_gen = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.limit = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.idle = torch.zeros((), dtype=torch.int64, device=dev)
        self.forwards = 0          #: decode steps run
        self.row_steps = 0         #: rows stepped, summed over steps
        self.chosen = 0            #: tokens chosen per row so far (the global step)
        self.prefill_tokens = 0    #: prompt tokens written, first cache
        self.prefills = 0          #: admissions (each one batched prefill)

    # ------------------------------------------------------------------ requests
    def submit(self, req: Request) -> None:
        """Queue ``req`` (admitted into the next free row)."""
        if len(req.prompts) != len(self.capacities):
            raise ValueError(f"request {req.index}: {len(req.prompts)} prompts for a mode with "
                             f"{len(self.capacities)} caches")
        for i, (p, cap) in enumerate(zip(req.prompts, self.capacities)):
            if len(p) + req.max_new_tokens > cap:
                raise ValueError(f"request {req.index}: prompt of {len(p)} tokens + max_new_tokens "
                                 f"{req.max_new_tokens} exceeds cache {i}'s capacity of {cap}")
        self.queue.append(req)

    @torch.inference_mode()
    def cancel(self, index: int) -> bool:
        """Drop request ``index``, queued or running (its row is freed at once)."""
        for r in list(self.queue):
            if r.index == index:
                self.queue.remove(r)
                return True
        for s, row in enumerate(self.slots):
            if row is not None and row.req.index == index:
                self.slots[s] = None
                self.done[s] = True
                return True
        return False

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.slots)

    @property
    def stats(self) -> dict:
        """Counts so far: decode ``steps``, ``row_steps`` (rows stepped), ``idle_row_steps`` (rows
        finished or empty during a step), ``prefill_tokens`` and ``prefills`` (admissions)."""
        return dict(steps=self.forwards, row_steps=self.row_steps,
                    idle_row_steps=int(self.idle), prefill_tokens=self.prefill_tokens,
                    prefills=self.prefills)

    # ------------------------------------------------------------------ loop
    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Submit ``requests`` and yield each one's completion as it finishes."""
        for group in self.groups(requests):
            yield from group

    def groups(self, requests: Iterable[Request]) -> Iterator[list[Completion]]:
        """Submit ``requests`` and yield the completions of each sync point that finished some."""
        for r in requests:
            self.submit(r)
        while self.busy:
            done = [c for c in self.advance() if c.finished]
            if done:
                yield done

    @torch.inference_mode()
    def advance(self, stream: bool = False) -> list[Completion]:
        """Admit what fits, decode until the next sync point, and report: the completions that
        finished, plus (``stream=True``) the new tokens of each running request as unfinished
        completions."""
        self._admit()
        if self.state is None:
            return []
        window = []
        while True:
            tok, fields = self.mode.choose(self.state)
            window.append(self._emit(tok, fields))
            self.chosen += 1
            if self._sync_due(len(window)):
                break
            self._step()
        out = self._sync(window, stream)
        if any(r is not None for r in self.slots):
            if self.compact and not self.queue:
                self._shrink()
            self._step()
        else:
            self.state = None
        return out

    def _emit(self, tok, fields):
        """Finished rows emit ``pad``; count and finish rows (EOS or their token limit)."""
        tok = torch.where(self.done, torch.full_like(tok, self.pad), tok)
        self.n_gen += (~self.done).long()
        self.done = self.done | torch.isin(tok, self.eos) | (self.n_gen >= self.limit)
        self.tok = tok
        return tok, fields

    def _sync_due(self, steps: int) -> bool:
        """Every ``sync_every`` steps, or as soon as a row has surely reached its limit."""
        if steps >= self.sync_every:
            return True
        return any(r is not None and self.chosen - r.admitted >= r.req.max_new_tokens
                   for r in self.slots)

    def _step(self):
        """One decode step of every row; finished rows keep their cache length."""
        spans = [c.scratch + min(cap, self._length_bound(i) + 1)
                 for i, (c, cap) in enumerate(zip(self.caches, self.capacities))]
        self.state = self.mode.step(self.tok, self.caches, spans)
        frozen = self.done.long()
        for c in self.caches:
            c.lengths.sub_(frozen)
        self.idle += frozen.sum()
        self.forwards += 1
        self.row_steps += self.rows

    def _length_bound(self, i: int) -> int:
        """An upper bound (host-side, no sync) of cache ``i``'s longest row after this step."""
        return max((len(r.req.prompts[i]) + self.chosen - r.admitted
                    for r in self.slots if r is not None), default=0)

    def _sync(self, window, stream: bool) -> list[Completion]:
        """Copy the window's tokens and fields to the host (one sync), hand them to their
        requests and free the rows that finished."""
        toks = torch.stack([t for t, _ in window], 1).cpu()
        names = list(window[0][1])
        fields = {k: torch.stack([f[k] for _, f in window], 1).cpu() for k in names}
        n_gen, done = self.n_gen.cpu(), self.done.cpu()
        out = []
        for s, row in enumerate(self.slots):
            if row is None:
                continue
            # every row in the window was admitted before it began, and a finished row emits
            # only pad: a row's new tokens are the window's first ``new``
            new = int(n_gen[s]) - len(row.tokens)
            row.tokens += toks[s, :new].tolist()
            for k in names:
                row.fields.setdefault(k, []).extend(fields[k][s, :new].tolist())
            if bool(done[s]):
                self.slots[s] = None
                out.append(Completion(row.req.index, row.tokens, row.fields))
            elif stream and new:
                out.append(Completion(row.req.index, toks[s, :new].tolist(),
                                      {k: fields[k][s, :new].tolist() for k in names}, finished=False))
        return out

    def _shrink(self):
        """Keep only the busy rows (plus free ones up to a power of two), in order."""
        busy = [s for s, r in enumerate(self.slots) if r is not None]
        target = 1 << (len(busy) - 1).bit_length()
        if target > self.rows // 2:
            return
        keep = busy + [s for s, r in enumerate(self.slots) if r is None][: target - len(busy)]
        idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
        caches = self.mode.new_caches(target, self.capacities)
        every = torch.arange(target, device=self.device)
        for new, old in zip(caches, self.caches):
            new.write_rows_(every, old.index_select(idx))
        self.caches = caches
        self.state = tuple(t.index_select(0, idx) for t in self.state)
        for name in ("tok", "done", "n_gen", "limit"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self.slots = [self.slots[s] for s in keep]
        self.rows = target

    # ------------------------------------------------------------------ admission
    def _admit(self):
        """Prefill queued requests into free rows (all at once, one prefill)."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        if not take:
            return
        slots = free[: len(take)]
        prompts = [[r.prompts[i] for r in take] for i in range(len(self.capacities))]
        if slots == list(range(self.rows)):          # the whole batch: prefill in place
            self.state = self.mode.prefill(prompts, self.caches)
        else:
            caps = [max(len(p) for p in ps) for ps in prompts]
            tmp = self.mode.new_caches(len(take), caps)
            new = self.mode.prefill(prompts, tmp)
            idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
            for big, small in zip(self.caches, tmp):
                big.write_rows_(idx, small)
            if self.state is None:
                self.state = tuple(torch.zeros((self.rows,) + t.shape[1:], dtype=t.dtype,
                                               device=t.device) for t in new)
            for old, t in zip(self.state, new):
                old[idx] = t
        for s, r in zip(slots, take):
            self.slots[s] = _Row(r, self.chosen)
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.done[idx] = False
        self.n_gen[idx] = 0
        self.limit[idx] = torch.tensor([r.max_new_tokens for r in take], device=self.device)
        self.prefill_tokens += sum(len(p) for p in prompts[0])
        self.prefills += 1
