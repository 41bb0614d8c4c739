"""The worker: the one thread that runs the models.

Every torch call of the server happens here. Requesters (the HTTP endpoints on the event loop,
or the lm-evaluation-harness model in its own thread) hand the worker :class:`Job` s and
cancellations through a thread-safe inbox, and get :class:`Tokens` / :class:`Failed` events back
through each job's ``emit`` callback (called on the worker thread; the server's callback moves
them onto the event loop with ``loop.call_soon_threadsafe``).

One round (:meth:`Worker.run_once`): take everything from the inbox (new jobs join their
scheduler's queue and are admitted into free rows at its next advance; cancellations free rows at
once), advance every busy scheduler once (round robin: each decodes up to ``sync_every`` tokens
and reports them), then run at most one power job.

* plain / hybrid-paper / hybrid-routed: one :class:`~hybridfast.scheduler.Scheduler` per
  distinct (method, temperature, top_k, threshold), created when first needed; at most
  ``max_schedulers`` exist, an idle one is dropped to make room, and a request that would need one
  more while all are busy is refused (503).
* the power methods are not continuously batched (MH and SMC chains resample whole blocks, the
  scalable sampler branches into candidates and rollouts): a power job runs to completion on this
  thread between scheduler rounds, so while it runs the batched requests wait. Its choices are
  its chains, decoded together.
"""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import torch

from ..scheduler import Request
from .errors import RequestError
from .methods import Settings
from .model_set import ModelSet

__all__ = ["Job", "Accepted", "Tokens", "Failed", "Worker"]

log = logging.getLogger("hybridfast.serving")


@dataclass
class Accepted:
    """The job was admitted: its choices are queued or running."""


@dataclass
class Tokens:
    """New tokens of choice ``choice`` (position in the job); ``finish_reason`` (``stop``: EOS,
    ``length``: max_tokens) when it ended."""
    choice: int
    tokens: list
    finish_reason: str | None = None


@dataclass
class Failed:
    """The job was refused or failed; no further events follow."""
    error: RequestError


@dataclass
class Job:
    """One request's work: a choice per entry of ``prompts`` (each a tuple of token-id lists,
    (base,) or (base, thinking)), up to ``max_tokens`` new tokens each. ``ids``: the choices'
    worker ids (:meth:`Worker.new_ids`), used to cancel them."""
    settings: Settings
    prompts: list
    max_tokens: int
    ids: list
    emit: Callable[[object], None]
    sampler: object = None            #: the PowerSampler of a power job (made on admission)


@dataclass
class _Route:
    """Where a running choice's tokens go."""
    job: Job
    choice: int
    key: tuple | None                 #: its scheduler's key (None: a power job)
    sent: int = 0


class Worker:
    """Runs jobs on one thread (see the module docstring). ``rows``: cache rows per scheduler;
    ``max_model_len``: tokens per row (prompt + completion); ``seed``: the schedulers' sampling
    noise (a fresh key per scheduler made) and the seeds of power jobs that give none."""

    def __init__(self, models: ModelSet, *, rows: int, max_model_len: int, max_schedulers: int, seed: int = 0):
        for name, value in (("rows", rows), ("max_model_len", max_model_len), ("max_schedulers", max_schedulers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.models, self.rows, self.max_model_len = models, rows, max_model_len
        self.max_schedulers, self.seed = max_schedulers, seed
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.schedulers: OrderedDict[tuple, object] = OrderedDict()     # least recently used first
        self.power_jobs: deque[Job] = deque()
        self.routes: dict[int, _Route] = {}
        self.counts = dict(finished=0, cancelled=0, failed=0)
        self._ids = itertools.count()
        self._seeds = random.Random(seed)
        #: the noise keys of new schedulers: each scheduler made gets its own (one key for all would
        #: give a scheduler made again, after an idle one was dropped, the samples it gave before,
        #: and schedulers of different settings the same noise)
        self._scheduler_seeds = random.Random(f"schedulers:{seed}")
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: what /health reports, replaced (never mutated) after every round
        self.snapshot: dict = self._snapshot()

    # ------------------------------------------------------------------ any thread
    @property
    def alive(self) -> bool:
        """The worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def new_ids(self, n: int) -> list:
        """``n`` fresh choice ids."""
        return [next(self._ids) for _ in range(n)]

    def submit(self, job: Job) -> None:
        """Queue ``job``; its first event is :class:`Accepted` or :class:`Failed`."""
        self.inbox.put(("submit", job))

    def cancel(self, ids) -> None:
        """Cancel the choices ``ids`` (queued or running; finished ones are ignored)."""
        self.inbox.put(("cancel", list(ids)))

    def start(self) -> None:
        """Run rounds on a new daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="hybridfast-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; jobs still queued or running fail (503)."""
        if self._thread is None:
            return
        self.inbox.put(("stop", None))
        self._thread.join()
        self._thread = None

    # ------------------------------------------------------------------ worker thread
    @property
    def idle(self) -> bool:
        """No scheduler is busy and no power job waits."""
        return not self.power_jobs and not any(s.busy for s in self.schedulers.values())

    def _loop(self) -> None:
        while not self._stopping:
            try:
                if self.idle:
                    self._handle(*self.inbox.get())      # sleep until there is work
                self.run_once()
            except Exception as e:  # noqa: BLE001 - a bug fails the requests in flight, not the thread
                log.exception("worker round failed")
                self._fail_routes(list(self.routes), RequestError(500, f"worker failed: {type(e).__name__}: {e}"))
        self._fail_all(RequestError(503, "the server is shutting down", code="shutdown"))

    def run_once(self) -> None:
        """One round: the inbox, one advance of every busy scheduler, at most one power job."""
        while True:
            try:
                self._handle(*self.inbox.get_nowait())
            except queue.Empty:
                break
        for key in list(self.schedulers):
            if self.schedulers[key].busy:
                self._advance(key)
        if self.power_jobs:
            self._run_power(self.power_jobs.popleft())
        self.snapshot = self._snapshot()

    def drain(self) -> None:
        """Run rounds on the calling thread until every submitted job has finished (for a caller
        that owns the worker instead of starting its thread)."""
        while True:
            self.run_once()
            if self.idle and self.inbox.empty():
                return

    def _handle(self, kind: str, payload) -> None:
        if kind == "submit":
            self._admit(payload)
        elif kind == "cancel":
            self._cancel(payload)
        else:
            self._stopping = True

    def _admit(self, job: Job) -> None:
        s = job.settings
        try:
            if s.batched:
                sched = self._scheduler(s)
                for cid, prompts in zip(job.ids, job.prompts):
                    sched.submit(Request(prompts, job.max_tokens, cid))
            else:
                job.sampler = self.models.power_sampler(s, job.max_tokens)
                self.power_jobs.append(job)
        except (RequestError, ValueError, NotImplementedError) as e:
            if s.batched and s.scheduler_key in self.schedulers:
                for cid in job.ids:
                    self.schedulers[s.scheduler_key].cancel(cid)
            err = e if isinstance(e, RequestError) else RequestError(400, str(e))
            self.counts["failed"] += 1
            job.emit(Failed(err))
            return
        for i, cid in enumerate(job.ids):
            self.routes[cid] = _Route(job, i, s.scheduler_key if s.batched else None)
        job.emit(Accepted())

    def _scheduler(self, s: Settings):
        """The scheduler of ``s``'s key, made (and an idle one dropped) when needed."""
        key = s.scheduler_key
        if key in self.schedulers:
            self.schedulers.move_to_end(key)
            return self.schedulers[key]
        if len(self.schedulers) >= self.max_schedulers:
            idle = [k for k, sched in self.schedulers.items() if not sched.busy]
            if not idle:
                raise RequestError(503, f"all {self.max_schedulers} schedulers (--max-schedulers) are busy with "
                                        f"other sampling settings; retry later or use the settings of a running "
                                        f"request", code="schedulers_busy")
            del self.schedulers[idle[0]]
        generator = torch.Generator().manual_seed(self._scheduler_seeds.randrange(2 ** 63))
        self.schedulers[key] = self.models.scheduler(s, self.rows, self.max_model_len, generator)
        return self.schedulers[key]

    def _cancel(self, ids) -> None:
        for cid in ids:
            route = self.routes.pop(cid, None)
            if route is None:
                continue
            self.counts["cancelled"] += 1
            if route.key is not None:
                self.schedulers[route.key].cancel(cid)
            elif all(i not in self.routes for i in route.job.ids) and route.job in self.power_jobs:
                self.power_jobs.remove(route.job)

    def _advance(self, key: tuple) -> None:
        try:
            done = self.schedulers[key].advance(stream=True)
        except Exception as e:  # noqa: BLE001 - a failed step fails its scheduler's requests, not the server
            log.exception("scheduler %s failed", key)
            del self.schedulers[key]
            self._fail_routes([cid for cid, r in self.routes.items() if r.key == key],
                              RequestError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        for c in done:
            route = self.routes.get(c.index)
            if route is None:
                continue
            new = c.tokens[route.sent:] if c.finished else c.tokens
            route.sent += len(new)
            self._send(route, c.index, new, self._finish_reason(c.tokens) if c.finished else None)

    def _run_power(self, job: Job) -> None:
        seed = job.settings.seed if job.settings.seed is not None else self._seeds.randrange(2 ** 63)
        try:
            results = job.sampler.sample([p[0] for p in job.prompts],
                                         generator=torch.Generator().manual_seed(seed))
        except Exception as e:  # noqa: BLE001
            log.exception("power job failed")
            self._fail_routes(job.ids, RequestError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        for cid, r in zip(job.ids, results):
            if cid in self.routes:
                self._send(self.routes[cid], cid, r.ids, self._finish_reason(r.ids))

    def _finish_reason(self, tokens: list) -> str:
        return "stop" if tokens and tokens[-1] in self.models.eos_ids else "length"

    def _send(self, route: _Route, cid: int, tokens: list, finish_reason: str | None) -> None:
        if finish_reason is not None:
            del self.routes[cid]
            self.counts["finished"] += 1
        route.job.emit(Tokens(route.choice, tokens, finish_reason))

    def _fail_routes(self, ids, err: RequestError) -> None:
        jobs = {}
        for cid in ids:
            route = self.routes.pop(cid, None)
            if route is not None:
                jobs[id(route.job)] = route.job
        self.counts["failed"] += len(jobs)
        for job in jobs.values():
            job.emit(Failed(err))

    def _fail_all(self, err: RequestError) -> None:
        while True:
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                payload.emit(Failed(err))
        self._fail_routes(list(self.routes), err)
        self.power_jobs.clear()

    def _snapshot(self) -> dict:
        scheds = [dict(method=k[0], temperature=k[1], top_k=k[2], threshold=k[3], rows=s.rows,
                       busy_rows=sum(r is not None for r in s.slots), queued=len(s.queue), **s.stats)
                  for k, s in self.schedulers.items()]
        return dict(schedulers=scheds, power_jobs_waiting=len(self.power_jobs), running_choices=len(self.routes),
                    **self.counts)
