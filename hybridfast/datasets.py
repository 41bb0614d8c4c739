"""GSM8K / MATH500 loading: a user's JSONL path, the offline copies in ``../shared/data``, the
bundled GSM8K sample (announced on stderr, never silently), or a Hugging Face ``datasets`` name
(needs network).

Problem ids come from content, never from a row's position: the row's ``unique_id`` (MATH500)
when it has one, else ``<dataset>-`` + the first 12 hex digits of the sha256 of the question. The
same problem has the same id whichever file, ``offset`` or ``limit`` it is loaded with.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path

from .io import parse_jsonl

__all__ = ["DataSource", "open_dataset", "problems_of", "problem_id", "load_problems", "find_data_dir",
           "gsm8k_gold"]

_FILES = {("gsm8k", "test"): "gsm8k/test.jsonl", ("gsm8k", "train"): "gsm8k/train.jsonl",
          ("math500", "test"): "math500/test.jsonl"}
_HF = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}


@dataclass(frozen=True)
class DataSource:
    """A dataset's raw rows, where they were read (``location``) and the sha256 of that content."""
    name: str
    split: str
    location: str
    sha256: str
    rows: list = field(repr=False, compare=False)

    def record(self) -> dict:
        """Provenance for a result row: name, split, location and content hash."""
        return dict(name=self.name, split=self.split, location=self.location, sha256=self.sha256)


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
    """The number after ``####``, thousands commas stripped; no marker, or no number after it,
    is an error (found here, not after a run has generated every answer)."""
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' marker: {str(answer)[-80:]!r}")
    gold = answer.split("####")[-1].strip().replace(",", "")
    try:
        Fraction(gold)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"GSM8K answer after '####' is not a number: {gold!r}") from None
    return gold


def _from_bytes(dataset: str, split: str, location: str, data: bytes) -> DataSource:
    return DataSource(dataset, split, location, hashlib.sha256(data).hexdigest(),
                      parse_jsonl(data.decode("utf-8"), location))


def _bundled_sample(split: str) -> DataSource:
    """The GSM8K sample shipped in the package, announced on stderr (it is not the full split)."""
    name = f"gsm8k_{split}_sample.jsonl"
    data = resources.files("hybridfast.data").joinpath(name).read_bytes()
    source = _from_bytes("gsm8k", split, f"hybridfast/data/{name} (bundled)", data)
    print(f"hybridfast: note: no gsm8k/{split}.jsonl in ../shared/data or $HYBRIDFAST_DATA_DIR; using the "
          f"bundled {len(source.rows)}-problem sample hybridfast/data/{name}", file=sys.stderr)
    return source


def _from_hub(dataset: str, split: str) -> DataSource:
    """Rows from ``datasets.load_dataset``; the hash is over their canonical JSON."""
    import datasets
    name, cfg = _HF[dataset]
    rows = [dict(r) for r in datasets.load_dataset(name, cfg, split=split)]
    blob = json.dumps(rows, sort_keys=True, default=str).encode()
    return DataSource(dataset, split, f"hf:{name}" + (f":{cfg}" if cfg else ""),
                      hashlib.sha256(blob).hexdigest(), rows)


def open_dataset(dataset: str = "gsm8k", split: str = "test", *, path: str | None = None,
                 hf: bool = False) -> DataSource:
    """The rows of a dataset: ``path``, else the hub (``hf=True``), else ``../shared/data``, else
    (GSM8K only) the bundled sample."""
    if dataset not in ("gsm8k", "math500"):
        raise ValueError(f"unknown dataset {dataset!r}; choose gsm8k or math500")
    if path is not None:
        return _from_bytes(dataset, split, str(path), Path(path).read_bytes())
    if hf:
        return _from_hub(dataset, split)
    if (dataset, split) not in _FILES:
        raise ValueError(f"no split {split!r} for {dataset}")
    d = find_data_dir()
    if d is not None and (d / _FILES[dataset, split]).exists():
        f = d / _FILES[dataset, split]
        return _from_bytes(dataset, split, str(f), f.read_bytes())
    if dataset == "gsm8k":
        return _bundled_sample(split)
    raise FileNotFoundError(f"no local copy of {dataset}/{split}: pass path= or hf=True")


def problem_id(dataset: str, row: dict, question: str) -> str:
    """The row's ``unique_id`` when it has one, else ``<dataset>-<sha256(question)[:12]>``."""
    if row.get("unique_id"):
        return str(row["unique_id"])
    return f"{dataset}-{hashlib.sha256(question.encode()).hexdigest()[:12]}"


def _question_and_gold(dataset: str, row: dict):
    if dataset == "gsm8k":
        return row.get("question"), gsm8k_gold(row.get("answer", ""))
    return row.get("problem"), row.get("answer")


def _normalise(source: DataSource) -> list[dict]:
    """Every row as ``{id, question, gold}``; an empty file, a malformed row or two rows with one id
    (the same question twice) is an error."""
    if not source.rows:
        raise ValueError(f"{source.location}: the dataset has no problems")
    out, row_of = [], {}
    for n, r in enumerate(source.rows, 1):
        try:
            q, gold = _question_and_gold(source.name, r)
        except ValueError as e:
            raise ValueError(f"{source.location}: row {n}: {e}") from None
        if not q or gold is None:
            raise ValueError(f"{source.location}: row {n} lacks a question/answer ({sorted(r)})")
        pid = problem_id(source.name, r, q)
        if pid in row_of:
            raise ValueError(f"{source.location}: rows {row_of[pid]} and {n} are the same problem (id {pid})")
        row_of[pid] = n
        out.append(dict(id=pid, question=q, gold=str(gold)))
    return out


def problems_of(source: DataSource, limit: int | None = None, offset: int = 0) -> list[dict]:
    """Problems ``offset .. offset + limit`` of ``source`` as ``[{id, question, gold}]`` (the whole
    file is validated, whatever the slice)."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    problems = _normalise(source)
    return problems[offset: None if limit is None else offset + limit]


def load_problems(dataset: str = "gsm8k", split: str = "test", *, path: str | None = None,
                  limit: int | None = None, offset: int = 0, hf: bool = False) -> list[dict]:
    """Problems as ``[{id, question, gold}]``; ``hf=True`` uses ``datasets.load_dataset``."""
    return problems_of(open_dataset(dataset, split, path=path, hf=hf), limit, offset)
