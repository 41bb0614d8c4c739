"""sample_logprobs, Triton kernels: stream over the vocabulary once, keeping per-lane online
log-sum-exp at temperature 1 and at the sampling temperature and a per-lane Gumbel-max winner.

Parallelism: the grid is (rows, splits). A row's vocabulary is cut into ``NSPLIT`` chunks so a
small batch still fills the GPU (B = 1 at V = 152k runs on ~75 CTAs instead of 1); each program
reduces its chunk to a partial state (max, sum, winner) and a second, one-program-per-row kernel
merges the partial states in split order. With one split the first kernel writes the outputs.

One ``exp`` per element and temperature: the online update uses ``e = exp(-|l - m|)``, which is
``exp(m - l)`` when the running max moves and ``exp(l - m)`` when it does not.

Floating point: compiled with ``enable_fp_fusion=False`` so the perturbed score
``l * (1/T) + gumbel`` is rounded exactly as in the reference and the C++ kernel (no FMA): the
same seed gives the same token in every implementation, except at ties within an ulp of ``log``.
The noise is the counter-based stream of ``hybridfast.ops.rng`` (bit-identical bits).

NaN policy: a row containing NaN returns token -1 and NaN log-probabilities (no host sync).
Greedy rows return ``logq = 0``; a row whose logits are all ``-inf`` returns token 0 with
``logp = logq = -inf`` (0 for greedy ``logq``), never NaN.
"""
import functools

import torch
import triton
import triton.language as tl

from .launch import launch

BIG = 2147483647
#: programs the split heuristic aims for without a device to ask (two per SM of an H100)
TARGET_PROGRAMS = 264


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Two programs per SM of ``device`` (the AOT default when it is not a CUDA device)."""
    if device.type != "cuda":
        return TARGET_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _online(m, s, l):
    """Per-lane online log-sum-exp update with one exp: returns the new (m, s)."""
    d = l - m
    e = tl.exp(-tl.abs(d))
    e = tl.where(d == d, e, 0.0)              # both -inf: nothing to add
    s = tl.where(d > 0, s * e + 1.0, s + e)
    return tl.maximum(m, l), s


@triton.jit
def _lse(m, s, axis: tl.constexpr):
    M = tl.max(m, axis=axis)
    Mb = tl.expand_dims(M, axis)
    S = tl.sum(tl.where(m != float("-inf"), s * tl.exp(m - Mb), 0.0), axis=axis)
    return M, S


@triton.jit
def _winner(best, best_i, best_logit, axis: tl.constexpr):
    """Highest score, lowest index among equal scores, and that index's logit."""
    top = tl.max(best, axis=axis)
    win = tl.min(tl.where(best == tl.expand_dims(top, axis), best_i, 2147483647), axis=axis)
    wl = tl.max(tl.where(best_i == tl.expand_dims(win, axis), best_logit, float("-inf")), axis=axis)
    return top, win, wl


@triton.jit
def _finish(tok_ptr, logp_ptr, logq_ptr, rows, rmask, M1, S1, MT, ST, win, wl, nan, inv_t,
            GREEDY: tl.constexpr):
    NEG = float("-inf")
    found = wl != NEG
    win = tl.where(win == 2147483647, 0, win)
    logp = tl.where(found, wl - (M1 + tl.log(S1)), NEG)
    if GREEDY:
        logq = tl.zeros_like(logp)
    else:
        logq = tl.where(found, wl * inv_t - (MT + tl.log(ST)), NEG)
    bad = nan > 0
    tl.store(tok_ptr + rows, tl.where(bad, -1, win).to(tl.int64), mask=rmask)
    tl.store(logp_ptr + rows, tl.where(bad, float("nan"), logp), mask=rmask)
    tl.store(logq_ptr + rows, tl.where(bad, float("nan"), logq), mask=rmask)


@triton.jit
def _sample_chunk_kernel(logits_ptr, seed_ptr, thr_ptr, tok_ptr, logp_ptr, logq_ptr,
                         part_f_ptr, part_i_ptr, B, V, s_b, chunk, inv_t,
                         GREEDY: tl.constexpr, HAS_TOPK: tl.constexpr, SPLIT: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row block, split) reduces logits[rows, split*chunk : (split+1)*chunk] over a
    [ROWS, BLOCK] tile (ROWS > 1 only for small vocabularies, which are never split)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    rb = rows.to(tl.int64)
    split = tl.program_id(1)
    NEG = float("-inf")
    lanes = tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr).to(tl.uint32)
    k1 = _mix32(seed ^ _mix32(rows.to(tl.uint32)))
    k2 = _mix32(k1 + 0x9E3779B9)
    if HAS_TOPK:
        thr = tl.load(thr_ptr + rb, mask=rmask, other=NEG).to(tl.float32)
    else:
        thr = tl.full([ROWS], NEG, tl.float32)
    m1 = tl.full([ROWS, BLOCK], NEG, tl.float32)
    s1 = tl.zeros([ROWS, BLOCK], tl.float32)
    mt = tl.full([ROWS, BLOCK], NEG, tl.float32)
    st = tl.zeros([ROWS, BLOCK], tl.float32)
    best = tl.full([ROWS, BLOCK], NEG, tl.float32)
    best_logit = tl.full([ROWS, BLOCK], NEG, tl.float32)
    best_i = tl.full([ROWS, BLOCK], 2147483647, tl.int32)
    nan = tl.zeros([ROWS, BLOCK], tl.int32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    for v0 in range(lo, hi, BLOCK):
        idx = v0 + lanes
        msk = rmask[:, None] & (idx < hi)[None, :]
        l = tl.load(logits_ptr + rb[:, None] * s_b + idx[None, :], mask=msk, other=NEG).to(tl.float32)
        nan += (l != l).to(tl.int32)
        m1, s1 = _online(m1, s1, l)
        if GREEDY:
            score = l
        else:
            keep = (l != NEG) & (l >= thr[:, None])
            sl = tl.where(keep, l * inv_t, NEG)
            mt, st = _online(mt, st, sl)
            bits = _mix32(_mix32(idx.to(tl.uint32)[None, :] ^ k1[:, None]) ^ k2[:, None])
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            score = sl + -tl.log(-tl.log(u))
        upd = (score > best) & msk
        best = tl.where(upd, score, best)
        best_logit = tl.where(upd, l, best_logit)
        best_i = tl.where(upd, idx[None, :], best_i)
    M1, S1 = _lse(m1, s1, 1)
    MT, ST = _lse(mt, st, 1)
    top, win, wl = _winner(best, best_i, best_logit, 1)
    n_nan = tl.sum(nan, axis=1)
    if SPLIT:
        nsplit = tl.num_programs(1)
        pf = part_f_ptr + (rb * nsplit + split) * 6
        tl.store(pf + 0, M1, mask=rmask)
        tl.store(pf + 1, S1, mask=rmask)
        tl.store(pf + 2, MT, mask=rmask)
        tl.store(pf + 3, ST, mask=rmask)
        tl.store(pf + 4, top, mask=rmask)
        tl.store(pf + 5, wl, mask=rmask)
        pi = part_i_ptr + (rb * nsplit + split) * 2
        tl.store(pi + 0, win, mask=rmask)
        tl.store(pi + 1, n_nan, mask=rmask)
    else:
        _finish(tok_ptr, logp_ptr, logq_ptr, rb, rmask, M1, S1, MT, ST, win, wl, n_nan, inv_t,
                GREEDY)


@triton.jit
def _sample_merge_kernel(part_f_ptr, part_i_ptr, tok_ptr, logp_ptr, logq_ptr, nsplit, inv_t,
                         GREEDY: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per row merges its ``nsplit`` partial states (in split order)."""
    rb = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    rmask = rb >= 0
    j = tl.arange(0, BLOCK_S)
    jm = (j < nsplit)[None, :]
    NEG = float("-inf")
    pf = part_f_ptr + (rb[:, None] * nsplit + j[None, :]) * 6
    pi = part_i_ptr + (rb[:, None] * nsplit + j[None, :]) * 2
    m1 = tl.load(pf + 0, mask=jm, other=NEG)
    s1 = tl.load(pf + 1, mask=jm, other=0.0)
    mt = tl.load(pf + 2, mask=jm, other=NEG)
    st = tl.load(pf + 3, mask=jm, other=0.0)
    best = tl.load(pf + 4, mask=jm, other=NEG)
    best_logit = tl.load(pf + 5, mask=jm, other=NEG)
    best_i = tl.load(pi + 0, mask=jm, other=2147483647)
    nan = tl.load(pi + 1, mask=jm, other=0)
    M1, S1 = _lse(m1, s1, 1)
    MT, ST = _lse(mt, st, 1)
    top, win, wl = _winner(best, best_i, best_logit, 1)
    _finish(tok_ptr, logp_ptr, logq_ptr, rb, rmask, M1, S1, MT, ST, win, wl, tl.sum(nan, axis=1),
            inv_t, GREEDY)


def launch_config(B: int, V: int, target_programs: int = TARGET_PROGRAMS) -> dict:
    """Tile, warps and vocabulary split for a [B, V] launch (also used by the AOT check)."""
    BLOCK = min(triton.next_power_of_2(V), 2048)
    ROWS = max(1, min(triton.next_power_of_2(B), 2048 // BLOCK, 64))     # tile <= 2048 elements
    num_warps = 8 if ROWS * BLOCK >= 2048 else 4 if ROWS * BLOCK >= 512 else 1
    nsplit = 1
    if ROWS == 1:
        nsplit = max(1, min(triton.cdiv(V, BLOCK), triton.cdiv(target_programs, max(B, 1))))
        chunk = triton.cdiv(triton.cdiv(V, nsplit), BLOCK) * BLOCK
        nsplit = triton.cdiv(V, chunk)
    else:
        chunk = V
    return dict(BLOCK=BLOCK, ROWS=ROWS, num_warps=num_warps, nsplit=nsplit, chunk=chunk,
                BLOCK_S=max(triton.next_power_of_2(nsplit), 2))


def sample_logprobs_triton(logits, inv_t, seed, topk_thresh=None, check_nan=False):
    """Launch the kernels; ``inv_t`` = float32(1/temperature) or 0.0 for greedy."""
    B, V = logits.shape
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float32, device=dev)
    logq = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tok, logp, logq
    if topk_thresh is not None:
        topk_thresh = topk_thresh.to(torch.float32).contiguous()
    cfg = launch_config(B, V, _target_programs(dev))
    split = cfg["nsplit"] > 1
    part_f = torch.empty((B, cfg["nsplit"], 6) if split else (1,), dtype=torch.float32, device=dev)
    part_i = torch.empty((B, cfg["nsplit"], 2) if split else (1,), dtype=torch.int32, device=dev)
    greedy = inv_t == 0.0
    launch(_sample_chunk_kernel, (triton.cdiv(B, cfg["ROWS"]), cfg["nsplit"]))(
        logits, seed, topk_thresh if topk_thresh is not None else logp, tok, logp, logq,
        part_f, part_i, B, V, logits.stride(0), cfg["chunk"], float(inv_t),
        GREEDY=greedy, HAS_TOPK=topk_thresh is not None, SPLIT=split, ROWS=cfg["ROWS"],
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"], enable_fp_fusion=False)
    if split:
        launch(_sample_merge_kernel, (B,))(part_f, part_i, tok, logp, logq, cfg["nsplit"], float(inv_t),
                                   GREEDY=greedy, BLOCK_S=cfg["BLOCK_S"], num_warps=1,
                                   enable_fp_fusion=False)
    return tok, logp, logq
