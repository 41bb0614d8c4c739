"""The tolerance rule for comparing kernels with the reference, kept in one place.

Rule (DESIGN.md section 3): against a float64 ground truth, a kernel's error may be at most
twice the error of the same-dtype reference plus a per-dtype floor (relative to the magnitude
of the truth). Category ids and sampled tokens are compared exactly except at near-ties.
"""
from __future__ import annotations

import torch

# Relative floors per output dtype. bf16/fp16: one ulp at 1 (the Triton interpreter truncates
# bf16 stores instead of rounding); float32: a few ulps of accumulated reordering.
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2.0 ** -10,
    torch.bfloat16: 2.0 ** -7,
}
# Absolute floor for log-probabilities (always computed in float32).
LOGPROB_ATOL = 2e-5
# Two routing scores closer than this (relative) are a near-tie: either winner is accepted.
TIE_RTOL = 1e-4


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                dtype: torch.dtype) -> None:
    """Raise AssertionError naming ``name`` if ``got`` breaks the tolerance rule."""
    g, r, t = got.double(), ref.double(), truth.double()
    err_k = (g - t).abs()
    err_r = (r - t).abs()
    allowed = 2 * err_r + FLOOR[dtype] * (1 + t.abs())
    nan_mismatch = torch.isnan(g) != torch.isnan(t)
    if nan_mismatch.any():
        raise AssertionError(f"{name}: NaN pattern differs from the reference")
    bad = (err_k > allowed) & ~torch.isnan(t)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} elements out of tolerance; first at {i}: got "
            f"{g[tuple(i)].item()}, reference {r[tuple(i)].item()}, truth {t[tuple(i)].item()}, "
            f"allowed error {allowed[tuple(i)].item():.3g}")
