"""Non-view aten ops and host syncs per decode step and per layer (hardware independent).

    python bench/bench_step_ops.py                                  # tiny-qwen2, tiny-llama
    python bench/bench_step_ops.py --config qwen2.5-1.5b --layers 2 3 --batch 1
    python bench/bench_step_ops.py --baseline OLD.json              # also show an earlier run

Counting rule and step rule: :mod:`hybridfast.opcount` (ops with a ``CompositeImplicitAutograd``
kernel decomposed; views, ``inplace_view`` ops and ``_unsafe_view`` not counted; one step =
``generate`` of T + 1 tokens minus ``generate`` of T; per layer = growth per extra decoder-block
execution). Modes: ``plain`` (Engine, greedy), ``routed`` and ``paper`` (HybridModel, greedy;
sae_layer 0, steer_layer 1, 3 paper coefficients). The ops are counted under
``HYBRIDFAST_IMPL=torch`` by default: the reference sampler and router dispatch every op they
run, whereas the C++ CPU kernels are opaque calls (and read their seed on the host).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_output_flags, env_info, result_path, show_warnings_once, table, write  # noqa: E402

from hybridfast.errors import ArgumentParser  # noqa: E402
from hybridfast.opcount import MODES, decode_step_counts  # noqa: E402
from hybridfast.tiny import bundled_config  # noqa: E402

COLS = ["config", "mode", "layers", "blocks_per_step", "ops_per_step", "ops_per_layer",
        "ops_outside_layers", "ops_per_step_per_block", "syncs_per_step"]
DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16)


def run(configs, layers, batch, dtype):
    rows = []
    for name in configs:
        cfg = bundled_config(name)
        for mode in MODES:
            r = decode_step_counts(mode, cfg, layers=tuple(layers), batch=batch, dtype=dtype)
            rows.append(dict(config=name, **r))
    return rows


def with_baseline(rows, path):
    """Annotate ``rows`` with an earlier run's ``ops_per_layer`` / ``ops_per_step`` /
    ``syncs_per_step`` (same config and mode); returns that run's env and rows."""
    old = json.loads(open(path).read())
    by = {(r["config"], r["mode"]): r for r in old["rows"]}
    for r in rows:
        b = by.get((r["config"], r["mode"]))
        if b is not None:
            for k in ("ops_per_layer", "ops_per_step", "syncs_per_step"):
                r[f"before_{k}"] = b[k]
    return old["env"], old["rows"]


def main(argv=None):
    ap = ArgumentParser(prog="bench_step_ops.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["tiny-qwen2", "tiny-llama"],
                    help="bundled model configs (default: %(default)s)")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4],
                    help="two layer counts (above steer_layer 1); per-layer = growth between them")
    ap.add_argument("--batch", type=int, default=2, help="rows per decode step (default: %(default)s)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (default: %(default)s)")
    ap.add_argument("--impl", default="torch", choices=["torch", "cpp", "auto"],
                    help="HYBRIDFAST_IMPL for the sampler and router during the count")
    ap.add_argument("--baseline", help="an earlier bench_step_ops JSON to show beside this run")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    tag = "-".join(a.config) + ("" if a.dtype == "fp32" else f"-{a.dtype}")
    out = result_path(ap, a, f"step-ops-{tag}")
    show_warnings_once()
    os.environ["HYBRIDFAST_IMPL"] = a.impl
    rows = run(a.config, a.layers, a.batch, DTYPES[a.dtype])
    payload = dict(env=env_info(), args=vars(a), rows=rows)
    cols = COLS
    if a.baseline:
        payload["before_env"], payload["before_rows"] = with_baseline(rows, a.baseline)
        cols = COLS + ["before_ops_per_layer", "before_ops_per_step", "before_syncs_per_step"]
    print(table(rows, cols))
    write(f"step-ops-{tag}", payload, out)
    return rows


if __name__ == "__main__":
    main()
