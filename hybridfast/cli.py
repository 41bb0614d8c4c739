"""Command line: ``hybridfast {demo,eval,report,discover,train-vectors,power-sample,bench,...}``."""
from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path

# command -> (help, "module:function" taking argv, or a bench script name)
COMMANDS = {
    "demo": ("run the whole pipeline on tiny bundled models", "hybridfast.demo:main"),
    "eval": ("evaluate a method on GSM8K/MATH500 (resumable, optional Ray)", "hybridfast.eval:main"),
    "report": ("markdown report of a run directory", "hybridfast.eval:report_main"),
    "discover": ("taxonomy discovery (traces, SAE)", "hybridfast.pipeline_cli:discover_main"),
    "train-vectors": ("train the steering vectors", "hybridfast.pipeline_cli:train_vectors_main"),
    "power-sample": ("power-sample prompts from a JSONL file (resumable)", "hybridfast.power_cli:main"),
    "bench": ("tokens/sec of the hybrid modes vs baselines (bench/bench_hybrid.py)", "bench_hybrid"),
    "bench-power": ("power-sampling benchmark (bench/bench_power.py)", "bench_power"),
}


def _run_bench(name: str, argv: list) -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not script.exists():
        raise SystemExit(f"benchmark script {script} not found (run from a source checkout)")
    sys.argv = [script.name] + argv
    runpy.run_path(str(script), run_name="__main__")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="hybridfast", description="hybrid steering and power sampling engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (help_, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        ap.parse_args(argv)       # prints help, or the error naming the unknown command
        return
    target = COMMANDS[argv[0]][1]
    if ":" not in target:
        _run_bench(target, argv[1:])
        return
    mod, fn = target.split(":")
    getattr(importlib.import_module(mod), fn)(argv[1:])


if __name__ == "__main__":
    main()
