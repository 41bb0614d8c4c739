"""Run metrics: accuracy with a Wilson 95% interval, gap recovery, steered fractions, tokens/s,
answers that could not be graded, and the markdown report table."""
from __future__ import annotations

import math
from collections import Counter

__all__ = ["wilson", "gap_recovery", "group_key", "dedupe", "MixedGraders", "summarize", "report_markdown"]

#: why a hybrid entry has no gap recovery where base and thinking tie on the shared problems
SAME_ACCURACY = "base and thinking have the same accuracy"


class MixedGraders(ValueError):
    """One summary entry holds rows graded by different graders (or grader versions)."""


def wilson(k: int, n: int, z: float = 1.96):
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def gap_recovery(acc_h, acc_b, acc_t):
    if acc_t == acc_b:
        return None
    return max(0.0, (acc_h - min(acc_b, acc_t)) / abs(acc_t - acc_b))


def _stats(rs):
    """Accuracy, interval, unparseable and ungradable counts, steered fractions and throughput of
    one group of rows (a row that records no ``grade_error``, from an older eval, counts 0)."""
    k = sum(bool(r["correct"]) for r in rs)
    toks = sum(r["tokens"] for r in rs)
    secs = sum(r.get("seconds", 0.0) for r in rs)
    return dict(n=len(rs), accuracy=k / len(rs), ci95=wilson(k, len(rs)),
                unparseable=sum(r["extracted"] is None for r in rs),
                grade_errors=sum(r.get("grade_error") is not None for r in rs),
                steered_fraction=sum(r["steered_tokens"] / max(1, r["tokens"]) for r in rs) / len(rs),
                steered_fraction_tokens=sum(r["steered_tokens"] for r in rs) / max(1, toks),
                tokens=toks, tokens_per_s=toks / secs if secs else None)


def _split(r):
    """The dataset split a row's run read (None for a row that records no ``run``: an older eval)."""
    return ((r.get("run") or {}).get("data") or {}).get("split")


def group_key(r) -> tuple:
    """The summary entry a result belongs to: (dataset, split, method, run_id)."""
    return (r.get("dataset"), _split(r), r["method"], r.get("run_id"))


def dedupe(results) -> tuple[list, int]:
    """The results with each problem once per summary row (the first row kept), and how many
    duplicates were dropped (a second writer or a merged file appends a problem twice)."""
    seen, kept = set(), []
    for r in results:
        key = (*group_key(r), r["problem"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(results) - len(kept)


def _check_graders(key: tuple, rows: list, run_dir) -> None:
    """A :class:`MixedGraders` when the rows of one summary entry were graded by different graders
    (a row that records none counts as grader None): their accuracy would pool two rules."""
    graders = sorted({r.get("grader") for r in rows}, key=str)
    if len(graders) > 1:
        dataset, split, method, run_id = key
        data = " ".join(str(x) for x in (dataset, split) if x is not None) or "no dataset recorded"
        raise MixedGraders(f"run {run_id} ({method}, {data}) holds rows graded by different graders "
                           f"({', '.join(map(str, graders))}); its accuracy would pool them: run `hybridfast regrade "
                           f"{run_dir or '<run dir>'}` to grade every row with the current grader")


def _shared_gap(hybrid: list, base: list, think: list) -> tuple:
    """(gap recovery, n, why there is none) over the problems that the three groups of rows share."""
    shared = set.intersection(*({r["problem"] for r in rs} for rs in (hybrid, base, think)))
    if not shared:
        return None, 0, "base, thinking and the hybrid share no problem"
    acc = [sum(bool(r["correct"]) for r in rs if r["problem"] in shared) / len(shared) for rs in (hybrid, base, think)]
    value = gap_recovery(*acc)
    return value, len(shared), SAME_ACCURACY if value is None else None


def _gap_recoveries(groups: dict, labels: dict) -> dict:
    """label -> (gap recovery, n, why none) of each hybrid entry, within its dataset and split,
    where those have exactly one base and one thinking entry."""
    out = {}
    for data in sorted({k[:2] for k in groups}, key=str):
        mine = {k: rs for k, rs in groups.items() if k[:2] == data}
        ends = [[rs for k, rs in mine.items() if k[2] == m] for m in ("base", "thinking")]
        if all(len(x) == 1 for x in ends):
            (base,), (think,) = ends
            out.update({labels[k]: _shared_gap(rs, base, think) for k, rs in mine.items() if k[2].startswith("hybrid")})
    return out


def _label(key: tuple, per_method: Counter) -> str:
    """An entry's key in ``methods``: its method, or ``method [dataset split run_id]`` (``-`` for
    one not recorded) where the method has several entries."""
    dataset, split, method, run_id = key
    if per_method[method] == 1:
        return method
    return f"{method} [{' '.join('-' if x is None else str(x) for x in (dataset, split, run_id))}]"


def summarize(results, run_dir=None):
    """One entry per (dataset, split, method, run_id), problems counted once each: rows of
    different datasets, splits or runs are never pooled, nor rows of one entry graded by different
    graders (:class:`MixedGraders`; ``run_dir`` names the folder in its advice). ``methods`` is
    keyed by the method, or by ``method [dataset split run_id]`` where a method has several entries;
    ``duplicates`` counts the rows dropped as repeats. Gap recovery is computed on the problems a
    hybrid entry shares with its base and thinking entries (``gap_recovery_n``); where it is None,
    ``gap_recovery_na`` says why."""
    rows, dropped = dedupe(results)
    groups = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    per_method = Counter(k[2] for k in groups)
    labels, entries = {}, {}
    for key in sorted(groups, key=lambda k: tuple("" if x is None else str(x) for x in k)):
        _check_graders(key, groups[key], run_dir)
        dataset, split, method, run_id = key
        labels[key] = label = _label(key, per_method)
        entries[label] = dict(dataset=dataset, split=split, method=method, run_id=run_id, **_stats(groups[key]))
    out = dict(methods=entries, duplicates=dropped)
    gaps = _gap_recoveries(groups, labels)
    if gaps:
        out["gap_recovery"] = {label: g[0] for label, g in gaps.items()}
        out["gap_recovery_n"] = {label: g[1] for label, g in gaps.items()}
        out["gap_recovery_na"] = {label: g[2] for label, g in gaps.items() if g[2] is not None}
    return out


def _gap_text(label: str, summary: dict) -> str:
    """The gap recovery of hybrid entry ``label`` as the report prints it: a percentage (with the
    problems it was computed on where that is not every problem of the three entries), or why
    there is none."""
    gaps = summary.get("gap_recovery", {})
    if label not in gaps:
        return "n/a (needs base and thinking on the same dataset)"
    if gaps[label] is None:
        return f"n/a ({summary.get('gap_recovery_na', {}).get(label, SAME_ACCURACY)})"
    n, e = summary["gap_recovery_n"][label], summary["methods"][label]
    ns = [x["n"] for x in summary["methods"].values()
          if (x["dataset"], x["split"]) == (e["dataset"], e["split"]) and x["method"] in ("base", "thinking")]
    note = "" if all(k == n for k in (*ns, e["n"])) else f" (on the {n} problems it shares with base and thinking)"
    return f"{gaps[label]:.1%}{note}"


def report_markdown(summary) -> str:
    lines = ["# hybridfast run report", ""]
    if summary.get("models"):
        lines += [f"Models: {summary['models']}.", ""]
    lines += ["| dataset | split | method | run | n | accuracy | 95% CI | unparseable | steered (per-problem) "
             "| steered (tokens) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["methods"].values():
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else ""
        lines.append(f"| {r['dataset'] or ''} | {r['split'] or ''} | {r['method']} | {r['run_id'] or ''} | {r['n']} "
                     f"| {r['accuracy']:.3f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['unparseable']} "
                     f"| {r['steered_fraction']:.3f} | {r['steered_fraction_tokens']:.3f} | {tps} |")
    if summary.get("duplicates"):
        lines += ["", f"{summary['duplicates']} duplicate rows (a problem already counted in its row) were ignored."]
    ungraded = {label: r["grade_errors"] for label, r in summary["methods"].items() if r["grade_errors"]}
    if ungraded:
        lines += ["", "Answers that could not be graded (counted as wrong; see each row's grade_error): "
                  + ", ".join(f"{k}: {v}" for k, v in ungraded.items())]
    hybrids = [label for label, r in summary["methods"].items() if r["method"].startswith("hybrid")]
    if hybrids:
        lines += ["", "Gap recovery (clipped at 0): " + ", ".join(f"{k}: {_gap_text(k, summary)}" for k in hybrids)]
    if summary.get("stages_seconds"):
        lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stages_seconds"].items())]
    return "\n".join(lines) + "\n"
