"""route_steer, Triton kernel: one program per row fuses SAE encode, argmax routing and the
steering add. The K-wide codes live only in registers.

NaN policy (the Triton path never synchronises with the host): a row whose pre-activations
contain NaN gets category -2 and is left unsteered (``out = h``); NaN in ``h`` propagates to
``out``. Callers that need an error check the categories when they next synchronise
(the engine does so once per generation).
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _centred_x(x_ptr, xmean_ptr, b, s_xb, s_xd, rs, rm, HAS_MEAN: tl.constexpr):
    u = tl.load(x_ptr + b * s_xb + rs * s_xd, mask=rm, other=0.0).to(tl.float32)
    if HAS_MEAN:
        u -= tl.load(xmean_ptr + rs, mask=rm, other=0.0).to(tl.float32)
    return u


@triton.jit
def _route_steer_kernel(
    h_ptr, x_ptr, w_ptr, benc_ptr, bdec_ptr, v_ptr, bias_ptr, xmean_ptr, coef_ptr, coefs_ptr,
    out_ptr, cat_ptr,
    d, d_r, K, C, threshold,
    s_hb, s_hd, s_xb, s_xd, s_wr, s_wk, s_vk, s_vd,
    HAS_BIAS: tl.constexpr, HAS_MEAN: tl.constexpr, NORMALIZE: tl.constexpr,
    EXPAND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    inv = 1.0
    if NORMALIZE:
        ss = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, d_r, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            u = _centred_x(x_ptr, xmean_ptr, b, s_xb, s_xd, rs, rs < d_r, HAS_MEAN)
            ss += u * u
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), 1e-12)
    z = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, d_r, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rm = rs < d_r
        u = _centred_x(x_ptr, xmean_ptr, b, s_xb, s_xd, rs, rm, HAS_MEAN)
        if NORMALIZE:
            u = u * inv
        u -= tl.load(bdec_ptr + rs, mask=rm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rs[:, None] * s_wr + ks[None, :] * s_wk,
                    mask=rm[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        z += tl.sum(u[:, None] * w, axis=0)
    z += tl.load(benc_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    is_nan = tl.sum(((z != z) & kmask).to(tl.int32), axis=0) > 0
    z = tl.where(kmask, z, float("-inf"))
    zmax = tl.max(z, axis=0)
    c = tl.min(tl.where(z == zmax, ks, BLOCK_K), axis=0)   # lowest index among ties
    c = tl.minimum(c, K - 1)
    steer = (zmax > threshold) & (~is_nan)
    cat = tl.where(steer, c, -1)
    cat = tl.where(is_nan, -2, cat)
    tl.store(cat_ptr + b, cat.to(tl.int64))
    steer_f = steer.to(tl.float32)
    if EXPAND:
        coef = 0.0
    else:
        coef = tl.load(coef_ptr + c).to(tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < d
        hv = tl.load(h_ptr + b * s_hb + ds * s_hd, mask=dm, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + c * s_vk + ds * s_vd, mask=dm, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + ds, mask=dm, other=0.0).to(tl.float32)
        if EXPAND:
            for j in range(0, C):
                s = tl.load(coefs_ptr + j).to(tl.float32) * steer_f
                res = hv + s * v
                tl.store(out_ptr + (b * C + j) * d + ds, res.to(out_ptr.dtype.element_ty), mask=dm)
        else:
            res = hv + (coef * steer_f) * v
            tl.store(out_ptr + b * d + ds, res.to(out_ptr.dtype.element_ty), mask=dm)


def route_steer_triton(h, x, W_enc, b_enc, b_dec, V, coef, bias=None, x_mean=None,
                       normalize=False, threshold=-math.inf, coefs=None, check_nan=False):
    """Launch the kernel; arguments are validated by ``hybridfast.ops.route_steer``."""
    B, d = h.shape
    d_r, K = W_enc.shape
    C = 0 if coefs is None else coefs.shape[0]
    out = torch.empty((B, C, d) if C else (B, d), dtype=h.dtype, device=h.device)
    cat = torch.empty(B, dtype=torch.int64, device=h.device)
    if B == 0:
        return out, cat
    coef_t = (coefs if coefs is not None else coef).to(torch.float32).contiguous()
    b_enc, b_dec = b_enc.contiguous(), b_dec.contiguous()
    bias = bias.contiguous() if bias is not None else None
    x_mean = x_mean.contiguous() if x_mean is not None else None
    dummy = h
    BLOCK_K = max(triton.next_power_of_2(K), 2)
    BLOCK_R = max(16, min(triton.next_power_of_2(d_r), 4096 // BLOCK_K))
    BLOCK_D = min(triton.next_power_of_2(d), 1024)
    thr = float(threshold)
    _route_steer_kernel[(B,)](
        h, x, W_enc, b_enc, b_dec, V,
        bias if bias is not None else dummy, x_mean if x_mean is not None else dummy,
        coef_t, coef_t, out, cat,
        d, d_r, K, C, thr if math.isfinite(thr) else (-3.0e38 if thr < 0 else 3.0e38),
        h.stride(0), h.stride(1), x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        V.stride(0), V.stride(1),
        HAS_BIAS=bias is not None, HAS_MEAN=x_mean is not None, NORMALIZE=bool(normalize),
        EXPAND=C > 0, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return out, cat
