"""Command line: ``hybridfast {bench,power-sample,demo,...}``."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def _bench_script(name: str) -> Path:
    here = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not here.exists():
        raise SystemExit(f"benchmark script {here} not found (run from a source checkout)")
    return here


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="hybridfast", description="hybrid steering and power sampling engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", help="tokens/sec of the hybrid modes vs baselines (bench/bench_hybrid.py)",
                   add_help=False)
    sub.add_parser("bench-power", help="power-sampling benchmark (bench/bench_power.py)", add_help=False)
    sub.add_parser("demo", help="run the whole pipeline on tiny bundled models", add_help=False)
    sub.add_parser("power-sample", help="power-sample prompts from a JSONL file (resumable)", add_help=False)
    sub.add_parser("eval", help="evaluate a method on GSM8K/MATH500 (resumable, optional Ray)", add_help=False)
    sub.add_parser("report", help="markdown report of a run directory", add_help=False)
    sub.add_parser("discover", help="taxonomy discovery (traces, SAE)", add_help=False)
    sub.add_parser("train-vectors", help="train the steering vectors", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        ap.parse_args(argv)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        sys.argv = ["bench_hybrid.py"] + rest
        runpy.run_path(str(_bench_script("bench_hybrid")), run_name="__main__")
    elif cmd == "bench-power":
        sys.argv = ["bench_power.py"] + rest
        runpy.run_path(str(_bench_script("bench_power")), run_name="__main__")
    elif cmd == "power-sample":
        from .power_cli import main as pmain
        pmain(rest)
    elif cmd == "eval":
        from .eval import main as emain
        emain(rest)
    elif cmd == "report":
        from .eval import report_main
        report_main(rest)
    elif cmd == "discover":
        from .pipeline_cli import discover_main
        discover_main(rest)
    elif cmd == "train-vectors":
        from .pipeline_cli import train_vectors_main
        train_vectors_main(rest)
    elif cmd == "demo":
        from .demo import main as dmain
        dmain(rest)
    else:
        ap.parse_args(argv)


if __name__ == "__main__":
    main()
