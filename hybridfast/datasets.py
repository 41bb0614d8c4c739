"""GSM8K / MATH500 loading: a user's JSONL path, the offline copies in ``../shared/data``, the
bundled GSM8K sample, or a Hugging Face ``datasets`` name (needs network)."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from .io import read_jsonl

__all__ = ["load_problems", "find_data_dir", "gsm8k_gold"]

_FILES = {("gsm8k", "test"): "gsm8k/test.jsonl", ("gsm8k", "train"): "gsm8k/train.jsonl",
          ("math500", "test"): "math500/test.jsonl"}
_HF = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}


def find_data_dir() -> Path | None:
    """``$HYBRIDFAST_DATA_DIR``, else a ``shared/data`` beside the checkout or the CWD."""
    env = os.environ.get("HYBRIDFAST_DATA_DIR")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    cands += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
              Path.cwd() / "shared" / "data"]
    for c in cands:
        if (c / "gsm8k").is_dir() or (c / "math500").is_dir():
            return c
    return None


def gsm8k_gold(answer: str) -> str:
    """The number after ``####``, thousands commas stripped."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def _normalise(dataset: str, rows: list[dict], source: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        if dataset == "gsm8k":
            q, gold = r.get("question"), gsm8k_gold(r.get("answer", ""))
        else:
            q, gold = r.get("problem"), r.get("answer")
        if not q or gold is None:
            raise ValueError(f"{source}: row {i} lacks a question/answer ({sorted(r)})")
        out.append(dict(id=r.get("unique_id", f"{dataset}-{i}"), question=q, gold=str(gold)))
    return out


def load_problems(dataset: str = "gsm8k", split: str = "test", *, path: str | None = None,
                  limit: int | None = None, offset: int = 0, hf: bool = False) -> list[dict]:
    """Problems as ``[{id, question, gold}]``; ``hf=True`` uses ``datasets.load_dataset``."""
    if dataset not in ("gsm8k", "math500"):
        raise ValueError(f"unknown dataset {dataset!r}; choose gsm8k or math500")
    if path is not None:
        rows, src = read_jsonl(Path(path)), str(path)
    elif hf:
        import datasets
        name, cfg = _HF[dataset]
        rows, src = list(datasets.load_dataset(name, cfg, split=split)), name
    else:
        d = find_data_dir()
        key = (dataset, split)
        if key not in _FILES:
            raise ValueError(f"no split {split!r} for {dataset}")
        if d is not None and (d / _FILES[key]).exists():
            rows, src = read_jsonl(d / _FILES[key]), str(d / _FILES[key])
        elif dataset == "gsm8k":
            name = f"gsm8k_{split}_sample.jsonl"
            text = resources.files("hybridfast.data").joinpath(name).read_text()
            rows, src = [json.loads(x) for x in text.splitlines() if x.strip()], name
        else:
            raise FileNotFoundError(f"no local copy of {dataset}/{split}: pass path= or hf=True")
    rows = rows[offset:]
    if limit is not None:
        rows = rows[:limit]
    ids_offset = offset
    out = _normalise(dataset, rows, src)
    if dataset == "gsm8k":
        for i, r in enumerate(out):
            r["id"] = f"gsm8k-{split}-{ids_offset + i}"
    return out
