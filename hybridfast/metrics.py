"""Run metrics: accuracy with a Wilson 95% interval, gap recovery, steered fractions, tokens/s,
and the markdown report table."""
from __future__ import annotations

import math
from collections import Counter

__all__ = ["wilson", "gap_recovery", "dedupe", "summarize", "report_markdown"]


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
    """Accuracy, interval, unparseable count, steered fractions and throughput of one group of rows."""
    k = sum(bool(r["correct"]) for r in rs)
    toks = sum(r["tokens"] for r in rs)
    secs = sum(r.get("seconds", 0.0) for r in rs)
    return dict(n=len(rs), accuracy=k / len(rs), ci95=wilson(k, len(rs)),
                unparseable=sum(r["extracted"] is None for r in rs),
                steered_fraction=sum(r["steered_tokens"] / max(1, r["tokens"]) for r in rs) / len(rs),
                steered_fraction_tokens=sum(r["steered_tokens"] for r in rs) / max(1, toks),
                tokens=toks, tokens_per_s=toks / secs if secs else None)


def _group(r) -> tuple:
    """The summary row a result belongs to: (dataset, method, run_id)."""
    return (r.get("dataset"), r["method"], r.get("run_id"))


def dedupe(results) -> tuple[list, int]:
    """The results with each problem once per summary row (the first row kept), and how many
    duplicates were dropped (a second writer or a merged file appends a problem twice)."""
    seen, kept = set(), []
    for r in results:
        key = (*_group(r), r["problem"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(results) - len(kept)


def _gap_recoveries(entries: dict) -> dict:
    """Gap recovery of each hybrid entry, within its dataset, where that dataset has exactly one base
    and one thinking entry."""
    out = {}
    for dataset in sorted({e["dataset"] for e in entries.values()}, key=str):
        mine = {label: e for label, e in entries.items() if e["dataset"] == dataset}
        ends = [[e for e in mine.values() if e["method"] == m] for m in ("base", "thinking")]
        if all(len(x) == 1 for x in ends):
            (base,), (think,) = ends
            out.update({label: gap_recovery(e["accuracy"], base["accuracy"], think["accuracy"])
                        for label, e in mine.items() if e["method"].startswith("hybrid")})
    return out


def summarize(results):
    """One entry per (dataset, method, run_id), problems counted once each: rows of different
    datasets or runs are never pooled. ``methods`` is keyed by the method, or by
    ``method [dataset run_id]`` where a method has several entries; ``duplicates`` counts the rows
    dropped as repeats."""
    rows, dropped = dedupe(results)
    groups = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    per_method = Counter(m for _, m, _ in groups)
    entries = {}
    for key in sorted(groups, key=lambda k: tuple("" if x is None else str(x) for x in k)):
        dataset, method, run_id = key
        label = method if per_method[method] == 1 else f"{method} [{dataset} {run_id}]"
        entries[label] = dict(dataset=dataset, method=method, run_id=run_id, **_stats(groups[key]))
    out = dict(methods=entries, duplicates=dropped)
    gaps = _gap_recoveries(entries)
    if gaps:
        out["gap_recovery"] = gaps
    return out


def _gap_text(label: str, gaps: dict) -> str:
    """The gap recovery of hybrid entry ``label`` as the report prints it: a percentage, or why
    there is none."""
    if label not in gaps:
        return "n/a (needs base and thinking on the same dataset)"
    if gaps[label] is None:
        return "n/a (base and thinking have the same accuracy)"
    return f"{gaps[label]:.1%}"


def report_markdown(summary) -> str:
    lines = ["# hybridfast run report", ""]
    if summary.get("models"):
        lines += [f"Models: {summary['models']}.", ""]
    lines += ["| dataset | method | run | n | accuracy | 95% CI | unparseable | steered (per-problem) "
             "| steered (tokens) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["methods"].values():
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else ""
        lines.append(f"| {r['dataset'] or ''} | {r['method']} | {r['run_id'] or ''} | {r['n']} | {r['accuracy']:.3f} "
                     f"| [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['unparseable']} | {r['steered_fraction']:.3f} "
                     f"| {r['steered_fraction_tokens']:.3f} | {tps} |")
    if summary.get("duplicates"):
        lines += ["", f"{summary['duplicates']} duplicate rows (a problem already counted in its row) were ignored."]
    hybrids = [label for label, r in summary["methods"].items() if r["method"].startswith("hybrid")]
    if hybrids:
        gaps = summary.get("gap_recovery", {})
        lines += ["", "Gap recovery (clipped at 0): " + ", ".join(f"{k}: {_gap_text(k, gaps)}" for k in hybrids)]
    if summary.get("stages_seconds"):
        lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stages_seconds"].items())]
    return "\n".join(lines) + "\n"
