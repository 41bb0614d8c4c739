"""``hybridfast regrade RUN_DIR``: grade every row of a run folder again with the current grader.

Each row's answer is extracted anew from its stored ``output`` and graded; the row's ``grader``
and ``grade_error`` are rewritten with it. ``results.jsonl`` is replaced atomically while the
folder's writer lock is held (no run can append meanwhile), then ``summary.json`` (its other keys
kept). A dataset whose grader is missing (MATH without math-verify) is refused before anything
is rewritten. Use it after :data:`hybridfast.grading.GRADER_VERSION` changes: the summary refuses
to pool rows graded by different graders. Exit status 1 when some answer could not be graded.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ArgumentParser, reported
from .eval import WriterLock, require_grader, run_results
from .grading import grade_fields
from .io import atomic_write_text, write_jsonl
from .metrics import summarize

__all__ = ["regrade_rows", "regrade", "main"]

#: the fields a regrade may change, compared to count changed rows
_GRADE_KEYS = ("extracted", "correct")


def regrade_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """``rows`` graded again, and how many changed their extracted answer or grade."""
    out = [{**r, **grade_fields(r["dataset"], r["output"], r["gold"])} for r in rows]
    changed = sum(any(a.get(k) != b.get(k) for k in _GRADE_KEYS) for a, b in zip(rows, out))
    return out, changed


def regrade(run_dir) -> dict:
    """Regrade ``run_dir/results.jsonl`` in place; returns counts: ``rows``, ``changed``,
    ``grade_errors`` and the ``graders`` used."""
    results, rows = run_results(run_dir)
    for dataset in sorted({r["dataset"] for r in rows}, key=str):
        require_grader(dataset)            # a missing grader must not turn good grades into errors
    with WriterLock(results):
        new, changed = regrade_rows(run_results(run_dir)[1])     # read again: as of the lock
        write_jsonl(results, new)
        summary = Path(run_dir) / "summary.json"
        kept = json.loads(summary.read_text()) if summary.is_file() else {}   # models, stage times, ...
        atomic_write_text(summary, json.dumps({**kept, **summarize(new, run_dir=run_dir)}, indent=1))
    return dict(rows=len(new), changed=changed, grade_errors=sum(r["grade_error"] is not None for r in new),
                graders=sorted({str(r["grader"]) for r in new}))


def main(argv=None):
    ap = ArgumentParser(prog="hybridfast regrade", description=__doc__)
    ap.add_argument("run_dir", help="a folder written by `hybridfast eval --out` (holding results.jsonl)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    with reported(a.debug):
        c = regrade(a.run_dir)
    print(f"{a.run_dir}: {c['rows']} rows graded by {', '.join(c['graders'])}: {c['changed']} changed "
          f"their answer or grade, {c['grade_errors']} could not be graded")
    if c["grade_errors"]:
        raise SystemExit(1)
