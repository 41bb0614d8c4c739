"""Pure-PyTorch references for every op. These define the semantics; the C++ and Triton
kernels are tested against them.

Numerics: inputs in fp16/bf16 are computed in float32 (float64 stays float64) and the
result is cast back to the dtype of ``h`` (``route_steer``) or returned in float32
(``sample_logprobs``).
"""
from __future__ import annotations

import math
import struct

import torch

from .rng import gumbel_noise


def inv_temperature(temperature: float) -> float:
    """float32(1 / temperature), rounded to nearest (inf past float32's range): every
    implementation scales logits by this same number. Computed on the host without a tensor, so
    a sampling step reads nothing back."""
    x = 1.0 / temperature
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)

__all__ = ["route_steer_ref", "sample_logprobs_ref"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def route_steer_ref(h, x, W_enc, b_enc, b_dec, V, coef, bias=None, x_mean=None,
                    normalize=False, threshold=-math.inf, coefs=None, check_nan=True):
    """Reference for :func:`hybridfast.ops.route_steer` (arguments already validated)."""
    if check_nan:
        if torch.isnan(x).any():
            bad = torch.isnan(x).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"route_steer: NaN in router activations x (rows {bad[:8]})")
        if torch.isnan(h).any():
            bad = torch.isnan(h).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"route_steer: NaN in residual h (rows {bad[:8]})")
    u = _acc(x)
    if x_mean is not None:
        u = u - _acc(x_mean)
    if normalize:
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    z = (u - _acc(b_dec)) @ _acc(W_enc) + _acc(b_enc)          # [B, K]
    zmax, cat = z.max(dim=-1)                                    # torch.max: first index on ties
    steered = zmax > threshold
    vec = _acc(V)[cat]                                           # [B, d]
    if bias is not None:
        vec = vec + _acc(bias)
    hb = _acc(h)
    if coefs is None:
        scale = torch.where(steered, _acc(coef)[cat], torch.zeros_like(zmax))
        out = hb + scale[:, None] * vec
    else:
        c = _acc(coefs)
        scale = torch.where(steered[:, None], c[None, :], torch.zeros(1, dtype=c.dtype, device=c.device))
        out = hb[:, None, :] + scale[:, :, None] * vec[:, None, :]
    category = torch.where(steered, cat, torch.full_like(cat, -1))
    return out.to(h.dtype), category


def sample_logprobs_ref(logits, temperature, seed, top_k=None, check_nan=True):
    """Reference for :func:`hybridfast.ops.sample_logprobs`.

    ``seed`` is an int64 tensor of shape [1] (drawn from the user's generator by the public
    wrapper); the Gumbel noise is the counter-based stream of :mod:`hybridfast.ops.rng`, so
    every implementation draws the same token for the same seed.
    """
    if check_nan and torch.isnan(logits).any():
        bad = torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"sample_logprobs: NaN in logits (rows {bad[:8]})")
    lg = logits.float() if logits.dtype != torch.float64 else logits
    B, Vn = lg.shape
    # a row with no finite logit (all -inf) has no distribution: token 0, logp = logq = -inf
    empty = (lg == -math.inf).all(dim=-1)
    logp_all = torch.log_softmax(lg, dim=-1)
    if temperature == 0:
        tok = lg.argmax(dim=-1)
        logp = logp_all.gather(1, tok[:, None])[:, 0].masked_fill(empty, -math.inf)
        return tok, logp.float(), torch.zeros_like(logp).float()
    scaled = lg * inv_temperature(temperature)
    if top_k is not None and top_k < Vn:
        kth = torch.topk(lg, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(lg < kth, -math.inf)
    g = gumbel_noise(seed, B, Vn, device=lg.device).to(scaled.dtype)
    tok = (scaled + g).argmax(dim=-1)
    logq_all = torch.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(1, tok[:, None])[:, 0].masked_fill(empty, -math.inf)
    logq = logq_all.gather(1, tok[:, None])[:, 0].masked_fill(empty, -math.inf)
    return tok, logp.float(), logq.float()
