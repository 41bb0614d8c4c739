"""Benchmark each op: PyTorch reference vs C++ (CPU) and vs Triton (CUDA), at realistic shapes.

    python bench/bench_ops.py            # full grid
    python bench/bench_ops.py --quick    # a few shapes (CI smoke)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, table, time_us, write  # noqa: E402

import hybridfast.ops as ops  # noqa: E402
from hybridfast.errors import ArgumentParser  # noqa: E402


def route_case(B, d, K, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    return (mk(B, d).to(dtype), mk(B, d), mk(d, K), mk(K), mk(d), mk(K, d).to(dtype),
            torch.rand(K, generator=g).to(dev)), dict(bias=mk(d).to(dtype), x_mean=mk(d),
                                                      normalize=True, threshold=0.0)


def main(argv=None):
    ap = ArgumentParser(prog="bench_ops.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes (CI smoke)")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    out = result_path(ap, a, "ops")
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    impls = ["torch"] + (["triton"] if cuda else (["cpp"] if ops.cpp_available() else []))
    fast = impls[-1]
    rows = []
    ds, Ks, Bs = ([1536], [15], [1, 8, 64]) if a.quick else ([1536, 3584, 5120], [5, 15, 50], [1, 8, 64, 256])
    dtype = torch.bfloat16
    for d, K, B in itertools.product(ds, Ks, Bs):
        args, kw = route_case(B, d, K, dev, dtype)
        r = dict(op="route_steer", B=B, d=d, K=K, dtype="bf16")
        for impl in impls:
            r[f"{impl}_us"] = time_us(lambda: ops.route_steer(*args, **kw, impl=impl, check_nan=False))
        r["speedup"] = r["torch_us"] / r[f"{fast}_us"]
        rows.append(r)
    Vn = 152064
    for B, T, k in itertools.product([1, 8] if a.quick else [1, 8, 64, 256], [1.0, 0.25],
                                     [None, 50]):
        logits = (torch.randn(B, Vn, generator=torch.Generator().manual_seed(1)) * 3).to(dev).bfloat16()
        seed = torch.tensor([7], device=dev)
        r = dict(op="sample_logprobs", B=B, V=Vn, T=T, top_k=k, dtype="bf16")
        for impl in impls:
            r[f"{impl}_us"] = time_us(lambda: ops.sample_logprobs(logits, T, top_k=k, seed=seed,
                                                                  impl=impl, check_nan=False))
        r["speedup"] = r["torch_us"] / r[f"{fast}_us"]
        rows.append(r)
    cols = ["op", "B", "d", "K", "V", "T", "top_k"] + [f"{i}_us" for i in impls] + ["speedup"]
    print(table(rows, cols))
    small = [r["speedup"] for r in rows if r["op"] == "route_steer" and r["B"] <= 8]
    write("ops", dict(env=env_info(), impls=impls, fast_impl=fast,
                      route_steer_min_speedup_B_le_8=min(small), rows=rows), out)


if __name__ == "__main__":
    main()
