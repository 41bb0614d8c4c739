"""Counted, hardware-independent cost of a decode step: non-view aten ops and host syncs.

Counting rule (:class:`OpCounter`): every aten op a piece of code dispatches is seen through a
``TorchDispatchMode``. Ops with a ``CompositeImplicitAutograd`` kernel (``linear``, ``reshape``,
``scaled_dot_product_attention``, ``item`` ...) are decomposed first, so the count is taken at
the level of the kernels that run, the same with or without ``torch.inference_mode``. An op
counts unless it only makes or changes a view: its overload returns an alias of an input
without writing it (``func.is_view``: view, transpose, expand, slice, select, unbind ...), it
is tagged ``inplace_view`` (``squeeze_``, ``transpose_`` ...), or it is ``_unsafe_view``.
In-place and ``out=`` ops (``add_``, ``index_copy_``) count.

A host sync is an op whose result the host must wait for: ``_local_scalar_dense`` (``item``,
``bool()``, ``int()``), the data-dependent-shape ops (``nonzero``, ``masked_select``,
``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``, ``index`` /
``index_put_`` with a boolean index), ``equal``, and a copy from an accelerator to the CPU.

Step rule (:func:`decode_step_counts`): the cost of one decode step is the count of a
``generate`` call that emits ``T + 1`` tokens minus that of one emitting ``T`` (same prompts,
no EOS), i.e. everything that scales with the number of generated tokens. The cost per layer
is the step's growth per extra decoder-block execution (models with two layer counts), and the
rest of the step is "outside the layers" (embedding, plan, LM head, sampling, routing).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "OpCounter", "count_ops", "decode_step_counts", "MODES"]

_aten = torch.ops.aten
_SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
             _aten.equal.default, _aten.bincount.default, _aten.unique_consecutive.default,
             _aten.unique_dim.default, _aten._unique.default, _aten._unique2.default}
_REPEAT_OPS = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
              _aten._index_put_impl_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


@dataclass
class OpCount:
    """Non-view aten ops and host syncs, with a per-op breakdown (``str(func) -> count``)."""
    ops: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)

    def __sub__(self, other: "OpCount") -> "OpCount":
        by_op = Counter(self.by_op)
        by_op.subtract(other.by_op)
        return OpCount(self.ops - other.ops, self.syncs - other.syncs,
                       Counter({k: v for k, v in by_op.items() if v}))


def is_view(func) -> bool:
    """True for ops that only make or change a view (see the module docstring)."""
    return func.is_view or torch.Tag.inplace_view in func.tags or func is _aten._unsafe_view.default


def is_host_sync(func, args, kwargs) -> bool:
    """True for ops whose result the host must wait for (see the module docstring)."""
    if func in _SYNC_OPS:
        return True
    if func in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs["indices"]
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func in _COPY_OPS:
        src = args[1] if func is _aten.copy_.default else args[0]
        dst = args[0].device if func is _aten.copy_.default else kwargs.get("device") or src.device
        return src.device.type != "cpu" and torch.device(dst).type == "cpu"
    if func in _REPEAT_OPS:
        return kwargs.get("output_size") is None
    return False


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` then ``c.count``: the ops and host syncs dispatched."""

    def __init__(self):
        super().__init__()
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.has_kernel_for_dispatch_key(_COMPOSITE):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if not is_view(func):
            self.count.ops += 1
            self.count.by_op[str(func)] += 1
        self.count.syncs += is_host_sync(func, args, kwargs)
        return func(*args, **kwargs)


def count_ops(fn) -> OpCount:
    """The ops and host syncs ``fn()`` dispatches."""
    with OpCounter() as counter:
        fn()
    return counter.count


# ----------------------------------------------------------------------------- decode steps
MODES = ("plain", "routed", "paper")
SAE_LAYER, STEER_LAYER, N_CATEGORIES, PAPER_COEFFICIENTS = 0, 1, 5, (0.5, 1.0, 2.0)


def _generator(mode: str, cfg: dict, batch: int, seed: int, dtype):
    """``gen(T)``: a greedy ``generate`` of ``T`` tokens in ``mode`` on random models built from
    ``cfg``, and the decoder-block executions per step."""
    from .engine import Engine
    from .hybrid import HybridModel
    from .tiny import model_from_config
    base = model_from_config(cfg, seed=seed, dtype=dtype)
    n, d, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, V, (batch, 5), generator=g).tolist()
    if mode == "plain":
        eng = Engine(base)
        return (lambda T: eng.generate(prompts, T, eos_token_id=-1)), n
    think = model_from_config(cfg, seed=seed + 1, dtype=dtype)
    tprompts = torch.randint(3, V, (batch, 7), generator=g).tolist()
    sae = dict(W_enc=torch.randn(d, N_CATEGORIES, generator=g), b_enc=torch.zeros(N_CATEGORIES),
               b_dec=torch.zeros(d))
    vec = (torch.randn(N_CATEGORIES, d, generator=g), torch.randn(d, generator=g))
    kw = dict(sae_layer=SAE_LAYER, steer_layer=STEER_LAYER)
    if mode == "routed":
        hm = HybridModel(base, think, sae, vec, mode="routed", threshold=0.0, **kw)
        blocks = n + SAE_LAYER + 1
    else:
        hm = HybridModel(base, think, sae, vec, coefficients=PAPER_COEFFICIENTS, **kw)
        blocks = 2 * n
    return (lambda T: hm.generate(prompts, tprompts, T, eos_token_id=-1)), blocks


def _step_count(gen, tokens: int) -> OpCount:
    gen(tokens)                                   # warm-up: first-call validation, allocations
    return count_ops(lambda: gen(tokens + 1)) - count_ops(lambda: gen(tokens))


def decode_step_counts(mode: str, cfg: dict, *, layers=(2, 4), batch: int = 2, tokens: int = 2,
                       seed: int = 0, dtype=torch.float32) -> dict:
    """Ops and host syncs of one decode step in ``mode`` (``plain``: :class:`Engine` greedy;
    ``routed`` / ``paper``: :class:`HybridModel`), per step and per decoder-block execution,
    for random models from ``cfg`` with each layer count in ``layers`` (see the module
    docstring). ``tokens`` + 1 must stay below the engine's ``sync_every``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(layers) != 2 or min(layers) <= STEER_LAYER:
        raise ValueError(f"layers must be two layer counts above {STEER_LAYER}, got {layers}")
    steps, blocks = [], []
    for n in layers:
        gen, b = _generator(mode, dict(cfg, num_hidden_layers=n), batch, seed, dtype)
        steps.append(_step_count(gen, tokens))
        blocks.append(b)
    growth = blocks[1] - blocks[0]
    per_layer = (steps[1].ops - steps[0].ops) / growth
    layer_ops = (steps[1] - steps[0]).by_op
    return dict(mode=mode, layers=layers[1], blocks_per_step=blocks[1], ops_per_step=steps[1].ops,
                ops_per_layer=per_layer, ops_outside_layers=steps[1].ops - per_layer * blocks[1],
                ops_per_step_per_block=steps[1].ops / blocks[1],
                syncs_per_step=max(s.syncs for s in steps),
                by_op_per_layer={k: v / growth for k, v in sorted(layer_ops.items())},
                by_op_per_step={k: v for k, v in sorted(steps[1].by_op.items())})
