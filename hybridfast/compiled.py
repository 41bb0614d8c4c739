"""Compiled decode steps: ``compile=`` on :class:`~hybridfast.Engine`,
:class:`~hybridfast.HybridModel` and :class:`~hybridfast.PowerSampler`.

A compiled step has static shapes: it attends over the cache's whole capacity (a length mask
hides the unwritten slots, so results equal the eager step's, which attends over a growing
span), and capacities are rounded up to a multiple of :data:`CAPACITY_BUCKET`, so prompts of
different lengths reuse one graph per batch size. Everything data-dependent (positions, masks,
write slots) is computed from device tensors inside the step: no host sync, nothing the graph
has to guard on. ``torch.compile(fullgraph=True)`` proves both on CPU; on CUDA ``compile=True``
uses ``mode="reduce-overhead"`` so the step replays as a CUDA graph, with the KV cache marked as
a static address (the cache is written in place by every step).

``compile`` takes ``False`` (eager), ``True`` (the defaults above), or a dict of
``torch.compile`` keyword arguments (e.g. ``{"backend": "aot_eager"}``) merged over them.

Recompilations: a step compiles once per batch size it meets, and Dynamo counts the entries of
every instance's step together (they share one code object: ``Engine._step``, ...). With
``fullgraph=True`` the 9th entry is a hard ``FailOnRecompileLimitHit`` under Dynamo's default
limit of 8 (two engines at four batch sizes each reach it), so compiling a step raises
``torch._dynamo.config.recompile_limit`` to at least :data:`RECOMPILE_LIMIT`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

__all__ = ["CAPACITY_BUCKET", "RECOMPILE_LIMIT", "compile_options", "compile_step", "bucketed",
           "new_cache"]

#: compiled steps round cache capacities up to a multiple of this many tokens
CAPACITY_BUCKET = 256
#: Dynamo's recompile limit is raised to at least this when a step is compiled (module doc)
RECOMPILE_LIMIT = 64

Compile = Union[bool, dict, None]


def compile_options(compile: Compile, device: torch.device) -> Optional[dict]:
    """``torch.compile`` keyword arguments for ``compile`` on ``device`` (None: eager)."""
    if not compile:
        return None
    opts = dict(fullgraph=True, dynamic=False)
    if torch.device(device).type == "cuda":
        opts["mode"] = "reduce-overhead"
    if isinstance(compile, dict):
        opts.update(compile)
    elif compile is not True:
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
    return opts


def compile_step(fn: Callable, options: Optional[dict]) -> Callable:
    """``fn`` itself when eager, else ``torch.compile(fn, **options)`` (with Dynamo's recompile
    limit raised to :data:`RECOMPILE_LIMIT`, see the module doc)."""
    if options is None:
        return fn
    _raise_recompile_limit(RECOMPILE_LIMIT)
    return torch.compile(fn, **options)


def _raise_recompile_limit(limit: int) -> None:
    import torch._dynamo
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)


def bucketed(capacity: int, options: Optional[dict]) -> int:
    """The cache capacity to allocate: rounded up to :data:`CAPACITY_BUCKET` when compiled."""
    if options is None:
        return capacity
    return -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET


def new_cache(m, batch: int, capacity: int, options: Optional[dict], **kw):
    """``m.new_cache`` for a step compiled with ``options``: the capacity rounded up to the
    bucket, and on CUDA graphs the cache tensors marked as static addresses (written in place
    by every replay)."""
    cache = m.new_cache(batch, bucketed(capacity, options), **kw)
    if options is not None and options.get("mode") == "reduce-overhead":
        for t in cache.kv + [cache.lengths]:
            torch._dynamo.mark_static_address(t)
    return cache
