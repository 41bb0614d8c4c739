"""Single-file HTML trace viewer: each generated token coloured by the category that steered it,
the category's name on hover (no external resources, no scripts needed)."""
from __future__ import annotations

import html

__all__ = ["trace_viewer_html", "PALETTE"]

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3"]


def trace_viewer_html(records: dict, names: list, title: str = "hybridfast traces") -> str:
    """``records[mode] = [{tokens, category, steered}, ...]`` -> HTML text."""
    css = ("body{font-family:sans-serif;margin:2em}.tok{white-space:pre-wrap}"
           ".s{border-radius:3px;padding:0 1px;color:#fff}.legend span{margin-right:1em;padding:2px 6px;"
           "border-radius:3px;color:#fff}.trace{border:1px solid #ccc;padding:.6em;margin:.6em 0;"
           "font-family:monospace}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1><div class='legend'>"]
    for j, n in enumerate(names):
        out.append(f"<span style='background:{PALETTE[j % len(PALETTE)]}'>{html.escape(str(n))}</span>")
    out.append("</div>")
    for mode, rows in records.items():
        out.append(f"<h2>{html.escape(mode)} mode</h2>")
        for i, r in enumerate(rows):
            out.append(f"<div class='trace' data-problem='{i}'><b>problem {i}</b><br><span class='tok'>")
            for t, c, s in zip(r["tokens"], r["category"], r["steered"]):
                t = html.escape(t)
                if s and c is not None and c >= 0:
                    name = html.escape(str(names[c]) if c < len(names) else f"idx{c}")
                    out.append(f"<span class='s' style='background:{PALETTE[c % len(PALETTE)]}' "
                               f"title='{name}'>{t}</span>")
                else:
                    out.append(t)
            out.append("</span></div>")
    out.append("</body></html>")
    return "".join(out)
