"""sample_logprobs, Triton kernel: one program per row streams over the vocabulary once,
keeping per-lane online log-sum-exp at temperature 1 and at the sampling temperature and a
per-lane Gumbel-max winner; lanes are combined at the end. Small vocabularies are processed as
tiles of several rows per program. The noise is the counter-based
stream of ``hybridfast.ops.rng`` (bit-identical bits; ``log`` may differ by an ulp).

NaN policy: a row containing NaN returns token -1 and NaN log-probabilities (no host sync).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _sample_kernel(logits_ptr, seed_ptr, thr_ptr, tok_ptr, logp_ptr, logq_ptr,
                   B, V, s_b, inv_t,
                   GREEDY: tl.constexpr, HAS_TOPK: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """A tile of ROWS rows per program (ROWS = 1 for large vocabularies)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    b = rows.to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    NEG = float("-inf")
    seed = tl.load(seed_ptr).to(tl.uint32)
    k1 = _mix32(seed ^ _mix32(rows.to(tl.uint32)))
    k2 = _mix32(k1 + 0x9E3779B9)
    if HAS_TOPK:
        thr = tl.load(thr_ptr + b, mask=rmask, other=NEG).to(tl.float32)
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
    for v0 in range(0, V, BLOCK):
        idx = v0 + lanes
        msk = rmask[:, None] & (idx < V)[None, :]
        l = tl.load(logits_ptr + b[:, None] * s_b + idx[None, :], mask=msk, other=NEG).to(tl.float32)
        nan += (l != l).to(tl.int32)
        nm = tl.maximum(m1, l)
        safe = nm != NEG
        nm0 = tl.where(safe, nm, 0.0)
        s1 = tl.where(safe, s1 * tl.exp(m1 - nm0) + tl.exp(l - nm0), 0.0)
        m1 = nm
        if GREEDY:
            score = l
        else:
            keep = msk & (l != NEG) & (l >= thr[:, None])
            sl = tl.where(keep, l * inv_t, NEG)
            nmt = tl.maximum(mt, sl)
            safe_t = nmt != NEG
            nmt0 = tl.where(safe_t, nmt, 0.0)
            st = tl.where(safe_t, st * tl.exp(mt - nmt0) + tl.exp(sl - nmt0), 0.0)
            mt = nmt
            bits = _mix32(_mix32(idx.to(tl.uint32)[None, :] ^ k1[:, None]) ^ k2[:, None])
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            g = -tl.log(-tl.log(u))
            score = sl + g
        upd = (score > best) & msk
        best = tl.where(upd, score, best)
        best_logit = tl.where(upd, l, best_logit)
        best_i = tl.where(upd, idx[None, :], best_i)
    # combine lanes
    M1 = tl.max(m1, axis=1)
    S1 = tl.sum(tl.where(m1 != NEG, s1 * tl.exp(m1 - M1[:, None]), 0.0), axis=1)
    top = tl.max(best, axis=1)
    win = tl.min(tl.where(best == top[:, None], best_i, 2147483647), axis=1)
    win = tl.where(win == 2147483647, 0, win)
    wl = tl.max(tl.where(best_i == win[:, None], best_logit, NEG), axis=1)
    logp = wl - (M1 + tl.log(S1))
    if GREEDY:
        logq = logp * 0.0
    else:
        MT = tl.max(mt, axis=1)
        ST = tl.sum(tl.where(mt != NEG, st * tl.exp(mt - MT[:, None]), 0.0), axis=1)
        logq = wl * inv_t - (MT + tl.log(ST))
    has_nan = tl.sum(nan, axis=1) > 0
    tl.store(tok_ptr + b, tl.where(has_nan, -1, win).to(tl.int64), mask=rmask)
    tl.store(logp_ptr + b, tl.where(has_nan, float("nan"), logp), mask=rmask)
    tl.store(logq_ptr + b, tl.where(has_nan, float("nan"), logq), mask=rmask)


def sample_logprobs_triton(logits, inv_t, seed, topk_thresh=None, check_nan=False):
    """Launch the kernel; ``inv_t`` = float32(1/temperature) or 0.0 for greedy."""
    B, V = logits.shape
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float32, device=dev)
    logq = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tok, logp, logq
    if topk_thresh is not None:
        topk_thresh = topk_thresh.to(torch.float32).contiguous()
    BLOCK = min(triton.next_power_of_2(V), 2048)
    # Small vocabularies: several rows per program (one row per program once V fills a block).
    ROWS = max(1, min(triton.next_power_of_2(B), 4096 // BLOCK, 64))
    _sample_kernel[(triton.cdiv(B, ROWS),)](
        logits, seed, topk_thresh if topk_thresh is not None else logp, tok, logp, logq,
        B, V, logits.stride(0), float(inv_t),
        GREEDY=inv_t == 0.0, HAS_TOPK=topk_thresh is not None, ROWS=ROWS, BLOCK=BLOCK,
    )
    return tok, logp, logq
