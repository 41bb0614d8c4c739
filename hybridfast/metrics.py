"""Run metrics: accuracy with a Wilson 95% interval, gap recovery, steered fractions, tokens/s,
and the markdown report table."""
from __future__ import annotations

import math

__all__ = ["wilson", "gap_recovery", "summarize", "report_markdown"]


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


def summarize(results):
    methods = sorted({r["method"] for r in results})
    s = {}
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        k = sum(bool(r["correct"]) for r in rs)
        toks = sum(r["tokens"] for r in rs)
        secs = sum(r.get("seconds", 0.0) for r in rs)
        s[m] = dict(n=len(rs), accuracy=k / len(rs), ci95=wilson(k, len(rs)),
                    unparseable=sum(r["extracted"] is None for r in rs),
                    steered_fraction=sum(r["steered_tokens"] / max(1, r["tokens"]) for r in rs) / len(rs),
                    steered_fraction_tokens=sum(r["steered_tokens"] for r in rs) / max(1, toks),
                    tokens=toks, tokens_per_s=toks / secs if secs else None)
    out = dict(methods=s)
    if "base" in s and "thinking" in s:
        out["gap_recovery"] = {m: gap_recovery(s[m]["accuracy"], s["base"]["accuracy"],
                                               s["thinking"]["accuracy"])
                               for m in s if m.startswith("hybrid")}
    return out


def report_markdown(summary) -> str:
    lines = ["# hybridfast run report", "",
             "Accuracies of random-weight demo models are meaningless; real models give real numbers.", "",
             "| method | n | accuracy | 95% CI | unparseable | steered (per-problem) | steered (tokens) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in summary["methods"].items():
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else ""
        lines.append(f"| {m} | {r['n']} | {r['accuracy']:.3f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
                     f"| {r['unparseable']} | {r['steered_fraction']:.3f} | {r['steered_fraction_tokens']:.3f} | {tps} |")
    if summary.get("gap_recovery"):
        lines += ["", "Gap recovery (clipped at 0; undefined when base = thinking): " +
                  ", ".join(f"{k}: {v if v is None else round(v, 3)}" for k, v in summary["gap_recovery"].items())]
    if summary.get("stages_seconds"):
        lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stages_seconds"].items())]
    return "\n".join(lines) + "\n"
