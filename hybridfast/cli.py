"""Command line: ``hybridfast {demo,eval,report,discover,train-vectors,power-sample,bench,...}``.

``hybridfast --version`` prints the version; a usage error (no or an unknown command) is one line
``hybridfast: error: ...`` with exit status 2. ``hybridfast COMMAND --help`` describes each
command and its flags.
"""
from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

from . import __version__
from .errors import ArgumentParser

# command -> (help, "module:function" taking argv, or a bench script name)
COMMANDS = {
    "demo": ("the whole pipeline on SmolLM2-135M in minutes (--tiny: tiny random models, seconds)",
             "hybridfast.demo:main"),
    "eval": ("evaluate a method on GSM8K/MATH500 (resumable, optional Ray)", "hybridfast.eval:main"),
    "report": ("markdown report of a run directory", "hybridfast.eval:report_main"),
    "regrade": ("grade a run directory's answers again with the current grader", "hybridfast.regrade:main"),
    "discover": ("taxonomy discovery (traces, SAE)", "hybridfast.pipeline_cli:discover_main"),
    "train-vectors": ("train the steering vectors", "hybridfast.pipeline_cli:train_vectors_main"),
    "power-sample": ("power-sample prompts from a JSONL file (resumable)", "hybridfast.power_cli:main"),
    "serve": ("OpenAI-compatible HTTP server (continuous batching; plain, hybrid and power methods)",
              "hybridfast.serving.cli:main"),
    "bench": ("tokens/sec of the hybrid modes vs baselines (bench/bench_hybrid.py; new timestamped "
              "result file unless --overwrite)", "bench_hybrid"),
    "bench-power": ("power-sampling benchmark (bench/bench_power.py; new timestamped result file unless "
                    "--overwrite)", "bench_power"),
}


def _run_bench(name: str, argv: list) -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not script.exists():
        raise SystemExit(f"benchmark script {script} not found (run from a source checkout)")
    sys.argv = [script.name] + argv
    runpy.run_path(str(script), run_name="__main__")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = ArgumentParser(prog="hybridfast", description="hybrid steering and power sampling engine; "
                        "`hybridfast COMMAND --help` describes a command")
    ap.add_argument("--version", action="version", version=f"hybridfast {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (help_, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        ap.parse_args(argv)       # --help, --version, or the one-line error naming the problem
        return
    target = COMMANDS[argv[0]][1]
    if ":" not in target:
        _run_bench(target, argv[1:])
        return
    mod, fn = target.split(":")
    getattr(importlib.import_module(mod), fn)(argv[1:])


if __name__ == "__main__":
    main()
