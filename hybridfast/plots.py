"""Dependency-free SVG plots for run reports: accuracy by method, category usage over token
position, MH acceptance rate over steps. :data:`PALETTE` is the one category palette: the charts
and the HTML trace viewer colour category id ``i`` with :func:`category_color` ``(i)``."""
from __future__ import annotations

import html

__all__ = ["PALETTE", "category_color", "bar_svg", "lines_svg", "stack_svg"]

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3"]


def category_color(i: int) -> str:
    """The colour of category id ``i`` (and of a chart's ``i``-th series), cycling through :data:`PALETTE`."""
    return PALETTE[i % len(PALETTE)]


def _frame(w, h, title, body):
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' "
            f"font-size='11'><rect width='{w}' height='{h}' fill='white'/>"
            f"<text x='{w / 2}' y='16' text-anchor='middle' font-size='13'>{html.escape(title)}</text>"
            f"{body}</svg>")


def bar_svg(values: dict, title: str, ymax: float = 1.0, w: int = 520, h: int = 260) -> str:
    """Vertical bars, one per key (e.g. accuracy by method)."""
    n = max(1, len(values))
    left, bottom, top = 40, h - 50, 30
    bw = (w - left - 10) / n
    parts = [f"<line x1='{left}' y1='{bottom}' x2='{w - 5}' y2='{bottom}' stroke='black'/>",
             f"<text x='5' y='{top + 4}'>{ymax:g}</text><text x='5' y='{bottom}'>0</text>"]
    for i, (k, v) in enumerate(values.items()):
        v = 0.0 if v is None else float(v)
        bh = (bottom - top) * min(v, ymax) / ymax
        x = left + i * bw + bw * 0.15
        parts.append(f"<rect x='{x:.1f}' y='{bottom - bh:.1f}' width='{bw * 0.7:.1f}' height='{bh:.1f}' "
                     f"fill='{category_color(i)}'><title>{html.escape(k)}: {v:.3f}</title></rect>")
        parts.append(f"<text x='{x + bw * 0.35:.1f}' y='{bottom + 14}' text-anchor='middle'>{html.escape(k)}</text>")
        parts.append(f"<text x='{x + bw * 0.35:.1f}' y='{bottom - bh - 3:.1f}' text-anchor='middle'>{v:.2f}</text>")
    return _frame(w, h, title, "".join(parts))


def lines_svg(series: dict, title: str, xlabel: str, ymax: float | None = None, w: int = 520,
              h: int = 260, colors: list | None = None) -> str:
    """One polyline per key; ``series[key] = [y0, y1, ...]`` over x = 0, 1, ...; ``colors[i]`` for the
    ``i``-th key (default: :func:`category_color` ``(i)``)."""
    left, bottom, top, right = 40, h - 40, 30, w - 110
    n = max((len(v) for v in series.values()), default=1)
    ym = ymax if ymax is not None else max((max(v) for v in series.values() if v), default=1.0) or 1.0
    parts = [f"<line x1='{left}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='black'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{bottom}' stroke='black'/>",
             f"<text x='{(left + right) / 2}' y='{h - 8}' text-anchor='middle'>{html.escape(xlabel)}</text>",
             f"<text x='5' y='{top + 4}'>{ym:.2g}</text><text x='5' y='{bottom}'>0</text>"]
    for i, (k, ys) in enumerate(series.items()):
        c = colors[i] if colors else category_color(i)
        pts = " ".join(f"{left + (right - left) * j / max(1, n - 1):.1f},{bottom - (bottom - top) * y / ym:.1f}"
                       for j, y in enumerate(ys))
        parts.append(f"<polyline points='{pts}' fill='none' stroke='{c}' stroke-width='2'/>")
        parts.append(f"<text x='{right + 8}' y='{top + 14 * (i + 1)}' fill='{c}'>{html.escape(str(k))}</text>")
    return _frame(w, h, title, "".join(parts))


def stack_svg(charts: list, w: int = 520, h: int = 260) -> str:
    """Charts of size ``w`` x ``h`` stacked top to bottom in one SVG."""
    body = "".join(f"<g transform='translate(0,{i * h})'>{c}</g>" for i, c in enumerate(charts))
    return f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h * len(charts)}'>{body}</svg>"
