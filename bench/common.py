"""Shared benchmark plumbing: environment record, timing, table and JSON output.

Result files: a run writes a new ``bench/results/<name>-<device>-<UTC time>.json`` and never
replaces an earlier result; ``--overwrite`` writes ``bench/results/<name>-<device>.json`` (the
file the README cites) instead; ``--out PATH`` writes PATH, refusing an existing file unless
``--overwrite``. A warning that repeats (e.g. transformers' eos warning on every ``generate``)
is shown once.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _device_tag() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_output_flags(ap) -> None:
    """``--out`` and ``--overwrite``, as every benchmark takes them (see the module doc)."""
    ap.add_argument("--out", help="JSON path to write (default: a new timestamped file in bench/results)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write bench/results/<name>-<device>.json (the file the README cites), replacing it; "
                         "with --out: replace an existing file")


def parse_with_smoke(ap, argv, smoke: dict):
    """Add ``--smoke`` and the output flags, parse ``argv``, and with ``--smoke`` set the
    ``smoke`` settings (a tiny model and sizes) over the parsed values."""
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds: checks the script runs")
    add_output_flags(ap)
    a = ap.parse_args(argv)
    if a.smoke:
        for k, v in smoke.items():
            setattr(a, k, v)
    return a


def bench_model(a, device):
    """``(model, tokenizer, eos id)``: ``--config``'s random weights (no tokenizer, eos -1) or
    ``--model`` (a named model, path or hub id) with its tokenizer's EOS."""
    from hybridfast.models import load_model
    from hybridfast.tiny import bundled_config, model_from_config
    if a.config:
        return model_from_config(bundled_config(a.config), seed=a.seed, device=device), None, -1
    model, tok = load_model(a.model, device=device)
    return model, tok, tok.eos_token_id


def result_path(ap, a, name: str) -> Path:
    """Where a benchmark named ``name`` writes, from its ``--out``/``--overwrite`` flags (call it
    before the run: a refused path is a usage error, exit 2, before any time is spent)."""
    if a.out:
        path = Path(a.out)
        if path.exists() and not a.overwrite:
            ap.error(f"--out {path} exists; pass --overwrite to replace it")
        return path
    stem = f"{name}-{_device_tag()}"
    if a.overwrite:
        return RESULTS / f"{stem}.json"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = RESULTS / f"{stem}-{stamp}.json", 1
    while path.exists():
        n += 1
        path = RESULTS / f"{stem}-{stamp}-{n}.json"
    return path


class _Once(logging.Filter):
    """Passes each distinct (level, message) once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record) -> bool:
        key = (record.levelno, record.getMessage())
        first = key not in self.seen
        self.seen.add(key)
        return first


def show_warnings_once() -> None:
    """From now on, each distinct warning (Python ``warnings`` and transformers' log) shows once."""
    import warnings
    from transformers.utils import logging as hf_logging
    once = _Once()
    for handler in hf_logging.get_logger("transformers").handlers:
        handler.addFilter(once)
    warnings.simplefilter("once", append=True)      # after the default ignores (ResourceWarning, ...)


def env_info() -> dict:
    import transformers
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                         cwd=Path(__file__).parent, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                             cwd=Path(__file__).parent, text=True).strip())
    except Exception:  # noqa: BLE001
        commit, dirty = None, None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu}"
    return dict(device=dev, cuda=torch.cuda.is_available(), torch=torch.__version__,
                triton=tv, transformers=transformers.__version__, python=sys.version.split()[0],
                threads=torch.get_num_threads(), commit=commit, dirty=dirty,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def count_syncs(fn):
    """``(result, host syncs)`` counted by CUDA's sync debug mode; ``(result, None)`` on CPU."""
    if not torch.cuda.is_available():
        return fn(), None
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out, sum("synchroniz" in str(x.message) for x in w)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_us(fn, *, warmup: int = 3, min_time: float = 0.2, max_iters: int = 2000) -> float:
    """Median microseconds per call over repeated batches."""
    for _ in range(warmup):
        fn()
    sync()
    samples, total, n = [], 0.0, 0
    while total < min_time and n < max_iters:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        samples.append(dt)
        total += dt
        n += 1
    return statistics.median(samples) * 1e6


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    out = [" | ".join(c.ljust(w[c]) for c in cols), "-+-".join("-" * w[c] for c in cols)]
    out += [" | ".join(_fmt(r.get(c)).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write(name: str, payload: dict, out=None, *, quiet: bool = False) -> Path:
    """Write ``out`` (default ``bench/results/<name>-<device>.json``) atomically and print the final
    JSON line (``quiet``: no line, for checkpoints of partial results)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(out) if out else RESULTS / f"{name}-{_device_tag()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    if not quiet:
        print(json.dumps({"result": str(path), **{k: v for k, v in payload.items()
                                                  if not isinstance(v, list)}}))
    return path
