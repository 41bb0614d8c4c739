"""pytest-benchmark view of the ops (not part of the test suite; run explicitly):

    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-json bench/results/pytest-benchmark-cpu.json
"""
import pytest
import torch

import hybridfast.ops as ops

IMPLS = ["torch"] + (["triton"] if torch.cuda.is_available() else ["cpp"])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,d,K", [(1, 1536, 15), (8, 1536, 15), (8, 3584, 50), (64, 5120, 50)])
def test_route_steer(benchmark, impl, B, d, K):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    args = (r(B, d).bfloat16(), r(B, d), r(d, K), r(K), r(d), r(K, d).bfloat16(), r(K).abs())
    benchmark(lambda: ops.route_steer(*args, bias=r(d).bfloat16(), normalize=True, impl=impl,
                                      check_nan=False))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,top_k", [(1, None), (8, None), (8, 50)])
def test_sample_logprobs(benchmark, impl, B, top_k):
    logits = (torch.randn(B, 152064, generator=torch.Generator().manual_seed(1)) * 3).to(DEV).bfloat16()
    seed = torch.tensor([3], device=DEV)
    benchmark(lambda: ops.sample_logprobs(logits, 0.25, top_k=top_k, seed=seed, impl=impl,
                                          check_nan=False))
