"""Public ops with three implementations each (Triton / C++ / PyTorch reference).

Dispatch: CUDA tensors -> Triton, CPU tensors -> C++ (``hybridfast._C``), float64 -> reference.
``HYBRIDFAST_IMPL=triton|cpp|torch`` (or ``impl=`` per call) forces one: an explicit choice that
cannot be met raises; an automatic choice that cannot be met falls back to the reference and
warns once saying why. Triton on CPU tensors works only under ``TRITON_INTERPRET=1``.

Both ops are also registered with ``torch.library`` (``torch.ops.hybridfast.route_steer`` and
``torch.ops.hybridfast.sample_logprobs``) so ``torch.compile`` sees them as single ops.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch

from .reference import inv_temperature, route_steer_ref, sample_logprobs_ref
from .rng import RandomStream

__all__ = ["route_steer", "sample_logprobs", "available_impls", "resolve_impl", "cpp_available"]

_IMPLS = ("triton", "cpp", "torch")
_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_warned: set[str] = set()
_cpp_mod = None
_cpp_error: Optional[str] = None
_triton_mod = None
_triton_error: Optional[str] = None


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _cpp():
    global _cpp_mod, _cpp_error
    if _cpp_mod is None and _cpp_error is None:
        try:
            from .. import _C  # type: ignore[attr-defined]
            _cpp_mod = _C
        except ImportError as e:
            _cpp_error = f"the C++ extension hybridfast._C is not built ({e})"
    return _cpp_mod


def cpp_available() -> bool:
    """True when the C++ CPU extension was compiled and imports."""
    return _cpp() is not None


def _import_kernels():
    """``hybridfast.kernels``: the installed package (``pip install`` maps the repository's
    ``kernels/`` folder there), or in a checkout that is not installed (``PYTHONPATH=.``, a bare
    GPU machine) that folder itself, loaded under the same name."""
    import importlib
    import importlib.util
    import sys
    pkg = __package__.rpartition(".")[0]
    name = f"{pkg}.kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise                                    # triton itself (or a dependency) is missing
        here = os.path.dirname(os.path.abspath(__file__))
        init = os.path.join(os.path.dirname(os.path.dirname(here)), "kernels", "__init__.py")
        if not os.path.isfile(init):
            raise
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    setattr(sys.modules[pkg], "kernels", mod)
    return mod


def _triton():
    global _triton_mod, _triton_error
    if _triton_mod is None and _triton_error is None:
        try:
            _triton_mod = _import_kernels()
        except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
            _triton_error = f"triton kernels unavailable ({type(e).__name__}: {e})"
        else:
            _register_triton_ops()
    return _triton_mod


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_impls(device: str = "cpu") -> list[str]:
    """Implementations that can run on tensors of ``device`` here."""
    out = ["torch"]
    if device == "cpu" and cpp_available():
        out.append("cpp")
    if (device != "cpu" or _interpret()) and _triton() is not None:
        out.append("triton")
    return out


def _why_not(impl: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if impl == "torch":
        return None
    if dtype not in _DT_CODE:
        return f"{impl} supports float32/float16/bfloat16, got {dtype}"
    if impl == "cpp":
        if device.type != "cpu":
            return f"cpp runs on CPU tensors, got device {device}"
        return None if cpp_available() else _cpp_error
    if device.type == "cpu" and not _interpret():
        return "triton on CPU tensors needs TRITON_INTERPRET=1"
    return None if _triton() is not None else _triton_error


def resolve_impl(device: torch.device, dtype: torch.dtype, impl: Optional[str] = None) -> str:
    """Pick the implementation for tensors on ``device`` of ``dtype`` (see module docstring)."""
    req = impl or os.environ.get("HYBRIDFAST_IMPL") or "auto"
    if req not in _IMPLS + ("auto",):
        raise ValueError(f"HYBRIDFAST_IMPL / impl must be one of {_IMPLS} or 'auto', got {req!r}")
    if req != "auto":
        why = _why_not(req, device, dtype)
        if why is not None:
            raise RuntimeError(f"implementation {req!r} was requested but cannot run: {why}")
        return req
    want = "triton" if device.type == "cuda" else "cpp"
    why = _why_not(want, device, dtype)
    if why is None:
        return want
    if not (want == "cpp" and dtype == torch.float64):
        _warn_once(f"{want}:{device.type}", f"hybridfast: using the PyTorch reference: {why}")
    return "torch"


# ----------------------------------------------------------------------------- validation

def _need(t, name, ndim, shape_desc):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_desc}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def _validate_route_steer(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, coefs):
    _need(h, "h", 2, "[B, d]")
    _need(x, "x", 2, "[B, d_r]")
    _need(W_enc, "W_enc", 2, "[d_r, K]")
    B, d = h.shape
    d_r, K = W_enc.shape
    if K < 1:
        raise ValueError(f"W_enc must have at least one latent, got shape {tuple(W_enc.shape)}")
    if x.shape[0] != B:
        raise ValueError(f"x has {x.shape[0]} rows but h has {B}: x {tuple(x.shape)}, h {tuple(h.shape)}")
    if x.shape[1] != d_r:
        raise ValueError(f"x width {x.shape[1]} does not match the SAE input size d_r={d_r} "
                         f"(W_enc {tuple(W_enc.shape)}): x {tuple(x.shape)}")
    _need(b_enc, "b_enc", 1, f"[K={K}]")
    if b_enc.shape[0] != K:
        raise ValueError(f"b_enc must have shape [K={K}], got {tuple(b_enc.shape)}")
    _need(b_dec, "b_dec", 1, f"[d_r={d_r}]")
    if b_dec.shape[0] != d_r:
        raise ValueError(f"b_dec must have shape [d_r={d_r}], got {tuple(b_dec.shape)}")
    _need(V, "V", 2, f"[K={K}, d={d}]")
    if tuple(V.shape) != (K, d):
        raise ValueError(f"V must have shape [K={K}, d={d}] (one steering vector per category, "
                         f"width of h), got {tuple(V.shape)}")
    if coefs is None:
        _need(coef, "coef", 1, f"[K={K}]")
        if coef.shape[0] != K:
            raise ValueError(f"coef must have shape [K={K}], got {tuple(coef.shape)}")
    else:
        _need(coefs, "coefs", 1, "[C]")
        if coefs.shape[0] < 1:
            raise ValueError(f"coefs must hold at least one coefficient, got {tuple(coefs.shape)}")
    if bias is not None:
        _need(bias, "bias", 1, f"[d={d}]")
        if bias.shape[0] != d:
            raise ValueError(f"bias must have shape [d={d}], got {tuple(bias.shape)}")
    if x_mean is not None:
        _need(x_mean, "x_mean", 1, f"[d_r={d_r}]")
        if x_mean.shape[0] != d_r:
            raise ValueError(f"x_mean must have shape [d_r={d_r}], got {tuple(x_mean.shape)}")
    named = dict(h=h, x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, V=V, coef=coef, bias=bias,
                 x_mean=x_mean, coefs=coefs)
    for n, t in named.items():
        if t is not None and t.device != h.device:
            raise ValueError(f"{n} is on {t.device} but h is on {h.device}")
    for n in ("V", "bias"):
        t = named[n]
        if t is not None and t.dtype != h.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but h has {h.dtype}; cast the steering "
                            f"table to the model dtype")
    for n in ("W_enc", "b_enc", "b_dec", "x_mean"):
        t = named[n]
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but x has {x.dtype}; SAE tensors and "
                            f"router activations must share a dtype")


# ----------------------------------------------------------------------------- route_steer

def _route_steer_cpp(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize, threshold, coefs):
    C = 0 if coefs is None else coefs.shape[0]
    B, d = h.shape
    d_r, K = W_enc.shape
    h, x, W_enc, b_enc, b_dec, V = (t.contiguous() for t in (h, x, W_enc, b_enc, b_dec, V))
    bias = bias.contiguous() if bias is not None else None
    x_mean = x_mean.contiguous() if x_mean is not None else None
    cf = (coefs if C else coef).detach().to(torch.float32).contiguous()
    out = torch.empty((B, C, d) if C else (B, d), dtype=h.dtype)
    cat = torch.empty(B, dtype=torch.int64)
    p = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    thr = float(threshold)
    bad = _cpp().route_steer(
        p(h), p(x), p(W_enc), p(b_enc), p(b_dec), p(V), p(bias), p(x_mean),
        p(cf) if not C else 0, p(cf) if C else 0, p(out), p(cat),
        B, d, d_r, K, C, _DT_CODE[h.dtype], _DT_CODE[x.dtype], bool(normalize),
        max(min(thr, 3.4e38), -3.4e38) if math.isfinite(thr) else thr)
    if bad >= 0:
        which = "x" if torch.isnan(x[bad]).any() else "h"
        raise ValueError(f"route_steer: NaN in {'router activations x' if which == 'x' else 'residual h'} "
                         f"(row {bad})")
    return out, cat


def _route_steer_impl(impl, h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize,
                      threshold, coefs, check_nan):
    if impl == "cpp":
        return _route_steer_cpp(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize,
                                threshold, coefs)
    if impl == "triton":
        return _triton().route_steer_triton(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean,
                                            normalize, threshold, coefs)
    return route_steer_ref(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize,
                           threshold, coefs, check_nan=check_nan)


def route_steer(h: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                b_dec: torch.Tensor, V: torch.Tensor, coef: Optional[torch.Tensor], *,
                bias: Optional[torch.Tensor] = None, x_mean: Optional[torch.Tensor] = None,
                normalize: bool = False, threshold: float = -math.inf,
                coefs: Optional[torch.Tensor] = None, impl: Optional[str] = None,
                check_nan: bool = True, validate: bool = True):
    """Fused SAE encode, argmax category routing and steering add.

    ``u = x - x_mean`` (if given), L2-normalised per row if ``normalize``;
    ``z = (u - b_dec) @ W_enc + b_enc``; ``c = argmax z`` (ties -> lowest index); a row is
    steered iff ``z[c] > threshold``. Steered rows: ``out = h + coef[c] * (V[c] + bias)``;
    others ``out = h``. Returns ``(out [B, d] in h's dtype, category [B] int64)`` with
    category ``-1`` for unsteered rows.

    With ``coefs [C]`` (``coef`` may then be None) the output is ``[B, C, d]``: row ``(b, j)``
    is steered by ``coefs[j] * (V[c_b] + bias)`` (the routing is shared by all candidates).

    NaN in ``x`` or ``h`` raises ``ValueError`` in the reference and C++ paths
    (``check_nan=False`` skips the reference's check, which synchronises). The Triton path never
    synchronises: rows with NaN router input get category -2 and ``out = h``.

    ``validate=False`` skips the shape/dtype/device checks: for decode loops that call the op
    with the same tensors every step after one validated call.
    """
    if validate:
        _validate_route_steer(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, coefs)
    dt = torch.float64 if torch.float64 in (h.dtype, x.dtype) else h.dtype
    which = resolve_impl(h.device, dt, impl)
    if torch.compiler.is_compiling():
        return _compiled_route_steer(which, h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean,
                                     normalize, float(threshold), coefs)
    return _route_steer_impl(which, h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize,
                             threshold, coefs, check_nan)


# ----------------------------------------------------------------------------- sample_logprobs

def _seed_from(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One kernel seed (int64 tensor [1] on ``device``) from ``generator`` on its own device.
    Loops should hold a :class:`~hybridfast.ops.rng.RandomStream` and pass ``seed=`` instead."""
    return RandomStream(generator, device).next_seed()


def _sample_cpp(logits, inv_t, seed, thresh):
    B, Vn = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tok = torch.empty(B, dtype=torch.int64)
    logp = torch.empty(B, dtype=torch.float32)
    logq = torch.empty(B, dtype=torch.float32)
    th = None if thresh is None else thresh.to(torch.float32).contiguous()
    bad = _cpp().sample_logprobs(logits.data_ptr(), _DT_CODE[logits.dtype], B, Vn,
                                 logits.stride(0), inv_t, int(seed.item()),
                                 0 if th is None else th.data_ptr(), tok.data_ptr(),
                                 logp.data_ptr(), logq.data_ptr())
    if bad >= 0:
        raise ValueError(f"sample_logprobs: NaN in logits (row {bad})")
    return tok, logp, logq


def _sample_impl(impl, logits, temperature, seed, top_k, check_nan):
    B, Vn = logits.shape
    if impl == "torch":
        return sample_logprobs_ref(logits, temperature, seed, top_k=top_k, check_nan=check_nan)
    inv_t = 0.0 if temperature == 0 else inv_temperature(temperature)
    thresh = None
    if top_k is not None and top_k < Vn and temperature != 0:
        thresh = torch.topk(logits, top_k, dim=-1).values[:, -1].float().contiguous()
    if impl == "cpp":
        return _sample_cpp(logits, inv_t, seed, thresh)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _triton().sample_logprobs_triton(logits, inv_t, seed, thresh)


def sample_logprobs(logits: torch.Tensor, temperature: float, *,
                    generator: Optional[torch.Generator] = None, top_k: Optional[int] = None,
                    seed: Optional[torch.Tensor] = None, impl: Optional[str] = None,
                    check_nan: bool = True):
    """Sample one token per row and return its log-probabilities.

    Samples from ``softmax(logits / temperature)`` restricted to logits ``>=`` the k-th largest
    when ``top_k`` is set (ties at the boundary kept, like ``transformers``' top-k warper).
    Returns ``(tokens [B] int64, logp [B] f32, logq [B] f32)``: ``logp`` is the full-vocabulary
    log-softmax at temperature 1 of the token, ``logq`` its log-probability under the
    distribution it was sampled from. ``temperature=0`` is greedy (ties -> lowest id) with
    ``logq = 0``. The noise is a counter-based stream keyed by a seed drawn from ``generator``
    (or passed as ``seed``, an int64 tensor [1]): same generator state -> same tokens, in every
    implementation.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a [B, V] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary, got {tuple(logits.shape)}")
    temperature = float(temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if seed is None:
        seed = _seed_from(generator, logits.device) if temperature != 0 else \
            torch.zeros(1, dtype=torch.int64, device=logits.device)
    which = resolve_impl(logits.device, logits.dtype, impl)
    if torch.compiler.is_compiling():
        return _compiled_sample(which, logits, temperature, seed, top_k)
    return _sample_impl(which, logits, temperature, seed, top_k, check_nan)


# ----------------------------------------------------------------------------- torch.library
# ``hybridfast::route_steer`` / ``hybridfast::sample_logprobs``: custom ops whose one kernel picks
# the implementation by device through ``resolve_impl`` (CPU: the C++ extension, else the
# reference; CUDA: Triton); the last argument forces one ("auto" lets the device decide).
# The Triton path is also a ``triton_op`` (``hybridfast::route_steer_triton`` /
# ``hybridfast::sample_logprobs_triton``) launched through ``wrap_triton``, so torch.compile
# traces the Triton kernels themselves (fusable, CUDA-graph capturable) instead of an opaque call.

def _compiled_route_steer(which, h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize,
                          threshold, coefs):
    if which == "triton":
        return torch.ops.hybridfast.route_steer_triton(h, x, W_enc, b_enc, b_dec, V, coef, bias,
                                                       x_mean, normalize, threshold, coefs)
    if which == "torch":
        return route_steer_ref(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize,
                               threshold, coefs, check_nan=False)
    return torch.ops.hybridfast.route_steer(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean,
                                            normalize, threshold, coefs, which)


def _compiled_sample(which, logits, temperature, seed, top_k):
    if which == "triton":
        return torch.ops.hybridfast.sample_logprobs_triton(logits, temperature, seed, top_k)
    if which == "torch":
        return sample_logprobs_ref(logits, temperature, seed, top_k=top_k, check_nan=False)
    return torch.ops.hybridfast.sample_logprobs(logits, temperature, seed, top_k, which)


@torch.library.custom_op("hybridfast::route_steer", mutates_args=())
def _route_steer_op(h: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                    b_dec: torch.Tensor, V: torch.Tensor, coef: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], x_mean: Optional[torch.Tensor],
                    normalize: bool, threshold: float, coefs: Optional[torch.Tensor],
                    impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    which = resolve_impl(h.device, h.dtype, None if impl == "auto" else impl)
    return _route_steer_impl(which, h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean,
                             normalize, threshold, coefs, check_nan=False)


@_route_steer_op.register_fake
def _(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean, normalize, threshold, coefs, impl):
    B, d = h.shape
    shape = (B, coefs.shape[0], d) if coefs is not None else (B, d)
    return h.new_empty(shape), h.new_empty((B,), dtype=torch.int64)


@torch.library.custom_op("hybridfast::sample_logprobs", mutates_args=())
def _sample_op(logits: torch.Tensor, temperature: float, seed: torch.Tensor,
               top_k: Optional[int], impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    which = resolve_impl(logits.device, logits.dtype, None if impl == "auto" else impl)
    return _sample_impl(which, logits, temperature, seed, top_k, check_nan=False)


@_sample_op.register_fake
def _(logits, temperature, seed, top_k, impl):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32),
            logits.new_empty((B,), dtype=torch.float32))



def _register_triton_ops() -> None:
    """Define the ``triton_op``s once, when the Triton kernels are first loaded (defining them
    imports triton, which ``import hybridfast`` must not)."""
    if hasattr(torch.ops.hybridfast, "route_steer_triton"):
        return

    @torch.library.triton_op("hybridfast::route_steer_triton", mutates_args=())
    def _route_steer_triton_op(h: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                               b_enc: torch.Tensor, b_dec: torch.Tensor, V: torch.Tensor,
                               coef: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               x_mean: Optional[torch.Tensor], normalize: bool, threshold: float,
                               coefs: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_mod.route_steer_triton(h, x, W_enc, b_enc, b_dec, V, coef, bias, x_mean,
                                              normalize, threshold, coefs)

    @torch.library.triton_op("hybridfast::sample_logprobs_triton", mutates_args=())
    def _sample_triton_op(logits: torch.Tensor, temperature: float, seed: torch.Tensor,
                          top_k: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _sample_impl("triton", logits, temperature, seed, top_k, check_nan=False)
