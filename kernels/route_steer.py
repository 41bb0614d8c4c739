"""route_steer, Triton kernels: SAE encode, argmax category routing and the steering add.

Two paths, one semantics (chosen by :func:`launch_config`):

* **fused** (K <= ``FUSED_MAX_K``, the taxonomies of the hybrid paper, K = 5..50): one program
  per row encodes ``z = (u - b_dec) @ W_enc + b_enc`` tile by tile over K with a running
  (max, lowest argmax), then writes the steered residual. One launch; the K-wide codes live
  only in registers; ``W_enc`` (at most a few MB) is re-read per row from L2.
* **tiled** (SAE-sized K, 16k..131k latents): ``W_enc`` is too large to re-read per row, so a
  first kernel computes ``[BLOCK_B, BLOCK_K]`` tiles of ``z`` for a block of rows with
  ``tl.dot`` (IEEE fp32, no TF32) reading ``W_enc`` once, and stores each tile's (max, argmax);
  a second kernel (one program per row) merges the tile results in K order and writes the
  steered residual. Codes are never materialised beyond a tile.

Ties go to the lowest index in both paths. ``enable_fp_fusion`` is left on (FMA in the dot
products): kernel and reference agree to the tolerance rule, categories exactly except at
near-ties.

NaN policy (the Triton path never synchronises with the host): a row whose pre-activations
contain NaN gets category -2 and is left unsteered (``out = h``); NaN in ``h`` propagates to
``out``. Callers that need an error check the categories when they next synchronise
(the engine does so once per generation).
"""
import math

import torch
import triton
import triton.language as tl

from .launch import launch

#: largest K served by the one-launch fused path
FUSED_MAX_K = 1024


@triton.jit
def _centred_x(x_ptr, xmean_ptr, b, s_xb, s_xd, rs, rm, HAS_MEAN: tl.constexpr):
    u = tl.load(x_ptr + b * s_xb + rs * s_xd, mask=rm, other=0.0).to(tl.float32)
    if HAS_MEAN:
        u -= tl.load(xmean_ptr + rs, mask=rm, other=0.0).to(tl.float32)
    return u


@triton.jit
def _inv_norm(x_ptr, xmean_ptr, b, s_xb, s_xd, d_r, HAS_MEAN: tl.constexpr,
              NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr):
    """1 / ||x[b] - x_mean|| for one row ``b``, or 1 without normalisation."""
    inv = 1.0
    if NORMALIZE:
        ss = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, d_r, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            u = _centred_x(x_ptr, xmean_ptr, b, s_xb, s_xd, rs, rs < d_r, HAS_MEAN)
            ss += u * u
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), 1e-12)
    return inv


@triton.jit
def _argmax_update(best, best_c, z, idx, K):
    """Running (max, argmax) over blocks visited in index order: the block's max with its
    lowest index among ties replaces the running one only if strictly greater."""
    top = tl.max(z, axis=0)
    c = tl.min(tl.where(z == top, idx, K), axis=0)
    better = top > best
    return tl.where(better, top, best), tl.where(better, c, best_c)


@triton.jit
def _steer_row(h_ptr, v_ptr, bias_ptr, coef_ptr, coefs_ptr, out_ptr, cat_ptr, b, c, zmax,
               is_nan, threshold, d, C, s_hb, s_hd, s_vk, s_vd,
               HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write the category of row ``b`` and its steered residual (or its C candidate rows)."""
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


@triton.jit
def _route_steer_fused_kernel(
    h_ptr, x_ptr, w_ptr, benc_ptr, bdec_ptr, v_ptr, bias_ptr, xmean_ptr, coef_ptr, coefs_ptr,
    out_ptr, cat_ptr,
    d, d_r, K, C, threshold,
    s_hb, s_hd, s_xb, s_xd, s_wr, s_wk, s_vk, s_vd,
    HAS_BIAS: tl.constexpr, HAS_MEAN: tl.constexpr, NORMALIZE: tl.constexpr,
    EXPAND: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row: encode over K tiles with a running argmax, then steer."""
    b = tl.program_id(0).to(tl.int64)
    inv = _inv_norm(x_ptr, xmean_ptr, b, s_xb, s_xd, d_r, HAS_MEAN, NORMALIZE, BLOCK_R)
    best = float("-inf")
    best_c = 0
    n_nan = 0
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        z = tl.zeros([BLOCK_K], dtype=tl.float32)
        for r0 in range(0, d_r, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            rm = rs < d_r
            u = _centred_x(x_ptr, xmean_ptr, b, s_xb, s_xd, rs, rm, HAS_MEAN) * inv
            u -= tl.load(bdec_ptr + rs, mask=rm, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rs[:, None] * s_wr + ks[None, :] * s_wk,
                        mask=rm[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            z += tl.sum(u[:, None] * w, axis=0)
        z += tl.load(benc_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        n_nan += tl.sum(((z != z) & kmask).to(tl.int32), axis=0)
        best, best_c = _argmax_update(best, best_c, tl.where(kmask, z, float("-inf")), ks, K)
    c = tl.minimum(best_c, K - 1)
    _steer_row(h_ptr, v_ptr, bias_ptr, coef_ptr, coefs_ptr, out_ptr, cat_ptr, b, c, best,
               n_nan > 0, threshold, d, C, s_hb, s_hd, s_vk, s_vd, HAS_BIAS, EXPAND, BLOCK_D)


@triton.jit
def _route_encode_tile_kernel(
    x_ptr, w_ptr, benc_ptr, bdec_ptr, xmean_ptr, part_z_ptr, part_c_ptr,
    B, d_r, K, s_xb, s_xd, s_wr, s_wk,
    HAS_MEAN: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (k tile, row block): z tile via tl.dot, then per-row (max, lowest argmax).
    A NaN anywhere in a row's tile is recorded as a NaN max."""
    kt = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = rows < B
    rb = rows.to(tl.int64)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    inv = tl.full([BLOCK_B], 1.0, tl.float32)
    if NORMALIZE:
        ss = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
        for r0 in range(0, d_r, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            u = _centred_x(x_ptr, xmean_ptr, rb[:, None], s_xb, s_xd, rs[None, :],
                           bm[:, None] & (rs < d_r)[None, :], HAS_MEAN)
            ss += u * u
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=1)), 1e-12)
    z = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, d_r, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        rm = rs < d_r
        u = _centred_x(x_ptr, xmean_ptr, rb[:, None], s_xb, s_xd, rs[None, :],
                       bm[:, None] & rm[None, :], HAS_MEAN) * inv[:, None]
        u -= tl.load(bdec_ptr + rs, mask=rm, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_ptr + rs[:, None] * s_wr + ks[None, :] * s_wk,
                    mask=rm[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        z = tl.dot(u, w, z, input_precision="ieee")
    z += tl.load(benc_ptr + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
    has_nan = tl.sum(((z != z) & kmask[None, :]).to(tl.int32), axis=1) > 0
    z = tl.where(kmask[None, :], z, float("-inf"))
    zm = tl.max(z, axis=1)
    zc = tl.min(tl.where(z == zm[:, None], ks[None, :], K), axis=1)
    nk = tl.num_programs(0)
    tl.store(part_z_ptr + rb * nk + kt, tl.where(has_nan, float("nan"), zm), mask=bm)
    tl.store(part_c_ptr + rb * nk + kt, zc, mask=bm)


@triton.jit
def _route_apply_kernel(
    h_ptr, v_ptr, bias_ptr, coef_ptr, coefs_ptr, out_ptr, cat_ptr, part_z_ptr, part_c_ptr,
    d, K, C, n_tiles, threshold, s_hb, s_hd, s_vk, s_vd,
    HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row: merge the K tiles' (max, argmax) in K order, then steer."""
    b = tl.program_id(0).to(tl.int64)
    best = float("-inf")
    best_c = 0
    n_nan = 0
    for t0 in range(0, n_tiles, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tm = ts < n_tiles
        zm = tl.load(part_z_ptr + b * n_tiles + ts, mask=tm, other=float("-inf"))
        zc = tl.load(part_c_ptr + b * n_tiles + ts, mask=tm, other=K)
        n_nan += tl.sum((zm != zm).to(tl.int32), axis=0)
        best, best_c = _argmax_update(best, best_c, zm, zc, K)
    c = tl.minimum(best_c, K - 1)
    _steer_row(h_ptr, v_ptr, bias_ptr, coef_ptr, coefs_ptr, out_ptr, cat_ptr, b, c, best,
               n_nan > 0, threshold, d, C, s_hb, s_hd, s_vk, s_vd, HAS_BIAS, EXPAND, BLOCK_D)


def launch_config(B: int, d: int, d_r: int, K: int) -> dict:
    """Path, tiles and warps for a launch (also used by the AOT check)."""
    BLOCK_D = min(triton.next_power_of_2(d), 1024)
    if K <= FUSED_MAX_K:
        BLOCK_K = min(max(triton.next_power_of_2(K), 2), 128)
        BLOCK_R = max(16, min(triton.next_power_of_2(d_r), 2048 // BLOCK_K))
        return dict(path="fused", BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    BLOCK_B = 16 if B <= 16 else 32
    BLOCK_K = 64
    n_tiles = triton.cdiv(K, BLOCK_K)
    return dict(path="tiled", BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_R=32, BLOCK_D=BLOCK_D,
                n_tiles=n_tiles, BLOCK_T=min(triton.next_power_of_2(n_tiles), 1024), num_warps=4)


def route_steer_triton(h, x, W_enc, b_enc, b_dec, V, coef, bias=None, x_mean=None,
                       normalize=False, threshold=-math.inf, coefs=None, check_nan=False):
    """Launch the kernels; arguments are validated by ``hybridfast.ops.route_steer``."""
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
    bias_arg = bias if bias is not None else h
    mean_arg = x_mean if x_mean is not None else h
    thr = float(threshold)
    thr = thr if math.isfinite(thr) else (-3.0e38 if thr < 0 else 3.0e38)
    cfg = launch_config(B, d, d_r, K)
    flags = dict(HAS_BIAS=bias is not None, EXPAND=C > 0, BLOCK_D=cfg["BLOCK_D"])
    if cfg["path"] == "fused":
        launch(_route_steer_fused_kernel, (B,))(
            h, x, W_enc, b_enc, b_dec, V, bias_arg, mean_arg, coef_t, coef_t, out, cat,
            d, d_r, K, C, thr,
            h.stride(0), h.stride(1), x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
            V.stride(0), V.stride(1),
            HAS_MEAN=x_mean is not None, NORMALIZE=bool(normalize), BLOCK_K=cfg["BLOCK_K"],
            BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"], enable_fp_fusion=True, **flags)
        return out, cat
    nt = cfg["n_tiles"]
    part_z = torch.empty((B, nt), dtype=torch.float32, device=h.device)
    part_c = torch.empty((B, nt), dtype=torch.int32, device=h.device)
    launch(_route_encode_tile_kernel, (nt, triton.cdiv(B, cfg["BLOCK_B"])))(
        x, W_enc, b_enc, b_dec, mean_arg, part_z, part_c, B, d_r, K,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        HAS_MEAN=x_mean is not None, NORMALIZE=bool(normalize), BLOCK_B=cfg["BLOCK_B"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"],
        enable_fp_fusion=True)
    launch(_route_apply_kernel, (B,))(
        h, V, bias_arg, coef_t, coef_t, out, cat, part_z, part_c, d, K, C, nt, thr,
        h.stride(0), h.stride(1), V.stride(0), V.stride(1),
        BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"], enable_fp_fusion=True, **flags)
    return out, cat
