"""Batched training of K steering vectors vs K sequential runs (same examples, same epochs, and
the same number of updates per vector: the sequential runs use batch / K rows per step, as the
paper's one-vector-at-a-time code does with batch 1-4).

    python bench/bench_vectors.py            # tiny model on CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, show_warnings_once, table, write  # noqa: E402

from hybridfast.errors import ArgumentParser  # noqa: E402
from hybridfast.steering import VectorExample, train_vectors  # noqa: E402
from hybridfast.tiny import bundled_config, model_from_config  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(prog="bench_vectors.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-qwen2",
                    help="bundled model config (random weights; default: %(default)s)")
    ap.add_argument("--K", type=int, nargs="+", default=[5, 15, 50], help="category counts (default: %(default)s)")
    ap.add_argument("--per-category", type=int, default=8, help="examples per category (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (default: %(default)s)")
    ap.add_argument("--rows-per-category", type=int, default=2,
                    help="rows per category in a batch (batched batch = K x this)")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    out = result_path(ap, a, f"vectors-{a.config}")
    show_warnings_once()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bundled_config(a.config)
    model = model_from_config(cfg, seed=0, device=dev)
    g = torch.Generator().manual_seed(0)
    rows = []
    for K in a.K:
        exs = [VectorExample(torch.randint(3, cfg["vocab_size"], (24,), generator=g).tolist(),
                             torch.randint(3, cfg["vocab_size"], (12,), generator=g).tolist(), c)
               for c in range(K) for _ in range(a.per_category)]
        kw = dict(epochs=a.epochs, batch_size=K * a.rows_per_category, patience=10**6)
        t0 = time.perf_counter()
        rb = train_vectors(model, exs, K, 1, **kw)
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = 0
        # each vector gets as many updates as in the batched run: batch / K rows per step
        kw_seq = dict(kw, batch_size=a.rows_per_category)
        for c in range(K):
            sub = [VectorExample(e.prompt_ids, e.target_ids, 0) for e in exs if e.category == c]
            steps += train_vectors(model, sub, 1, 1, **kw_seq).steps
        ts = time.perf_counter() - t0
        rows.append(dict(K=K, examples=len(exs), batched_s=tb, batched_steps=rb.steps,
                         sequential_s=ts, sequential_steps=steps, speedup=ts / tb))
    print(table(rows, ["K", "examples", "batched_s", "batched_steps", "sequential_s",
                       "sequential_steps", "speedup"]))
    write(f"vectors-{a.config}", dict(env=env_info(), args=vars(a), rows=rows), out)


if __name__ == "__main__":
    main()
