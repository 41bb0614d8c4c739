"""Run views: a single-file HTML trace viewer (per problem: the question, the generated answer with
each steered token coloured by its category and the category's name on hover, the gold answer and
the grade; no external resources, no scripts), the category-usage and MH-acceptance charts, and
the row fields they read.

Result rows (as ``hybridfast eval`` and the demo write them) hold ``question``, ``output``, ``gold``,
``extracted`` and ``correct``; rows of the hybrid methods add :func:`token_fields` (``ids``, the
text ``pieces`` of each token, per-token ``category`` and ``steered``, the ``category_names``), rows
of MH power sampling add :func:`mh_fields` (``mh_accepted``: per MH step, whether it was accepted).
"""
from __future__ import annotations

import html
from pathlib import Path

from .metrics import dedupe, group_key
from .plots import PALETTE, bar_svg, category_color, lines_svg, stack_svg

__all__ = ["TRACE_FIELDS", "token_pieces", "token_fields", "mh_fields", "grade_label", "sections", "trace_viewer_html",
           "category_usage", "mh_acceptance", "write_views", "PALETTE", "category_color"]

#: the fields :func:`token_fields` and :func:`mh_fields` add to a result row
TRACE_FIELDS = ("ids", "pieces", "category", "steered", "category_names", "mh_accepted")
REPLACEMENT = "\ufffd"       # what a decoder writes for bytes that are not (yet) a whole character


def token_pieces(tokenizer, ids, **decode_kwargs) -> list[str]:
    """The text each token of ``ids`` adds to ``tokenizer.decode(ids, **decode_kwargs)``, found the
    way streaming detokenisers find it: decode the tokens from the previous stable point on and
    emit the text past what that point had already emitted. A token that ends inside a multi-byte
    character adds ``""`` until a later token completes the character, so a piece holds U+FFFD only
    where the full decode does; only ids that end mid-character leave one, in the last piece. The
    pieces concatenate to the full decode (for decoders, like byte-level BPE and SentencePiece,
    whose text of a window of tokens grows by appending)."""
    pieces, prefix, read = [], 0, 0      # window start (one stable token of context); end of emitted tokens
    for end in range(1, len(ids) + 1):
        done = tokenizer.decode(ids[prefix:read], **decode_kwargs)
        text = tokenizer.decode(ids[prefix:end], **decode_kwargs)
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            pieces.append(text[len(done):])
            prefix, read = read, end
        else:
            pieces.append("")
    if read < len(ids):                  # the ids end inside a character: flush what the decoder wrote
        pieces[-1] = tokenizer.decode(ids[prefix:], **decode_kwargs)[
            len(tokenizer.decode(ids[prefix:read], **decode_kwargs)):]
    return pieces


def token_fields(result, tokenizer, names) -> dict:
    """The viewer's fields of one hybrid result (ids, category, steered per token): its token
    texts decoded as its ``text`` is (special tokens skipped), and the category names."""
    return dict(ids=list(result.ids), pieces=token_pieces(tokenizer, result.ids, skip_special_tokens=True),
                category=list(result.category), steered=[bool(s) for s in result.steered],
                category_names=list(names))


def mh_fields(result) -> dict:
    """``mh_accepted`` of an MH chain's ``result``: one flag per MH step the chain took part in
    (its ``stats["accepted"]``). Empty for SMC, which records none."""
    if "accepted" not in result.stats:
        return {}
    return dict(mh_accepted=[bool(a) for a in result.stats["accepted"]])


def grade_label(row) -> str:
    """``ungraded`` (the grader failed: ``grade_error``), ``unparseable`` (no answer extracted),
    ``correct`` or ``incorrect``."""
    if row.get("grade_error"):
        return "ungraded"
    if row["extracted"] is None:
        return "unparseable"
    return "correct" if row["correct"] else "incorrect"


def sections(rows, summary) -> dict:
    """The rows of each entry of ``summary["methods"]`` (same dataset, split, method and run), each
    problem once, keyed by the entry's label."""
    kept, _ = dedupe(rows)
    return {label: [r for r in kept if group_key(r) == (e["dataset"], e["split"], e["method"], e["run_id"])]
            for label, e in summary["methods"].items()}


_CSS = ("body{font-family:sans-serif;margin:2em}.tok{white-space:pre-wrap}"
        ".s{border-radius:3px;padding:0 1px;color:#fff}.legend span{margin-right:1em;padding:2px 6px;"
        "border-radius:3px;color:#fff}.trace{border:1px solid #ccc;padding:.6em;margin:.6em 0}"
        ".answer{font-family:monospace;margin:.4em 0}.correct{color:#080}.incorrect{color:#c00}"
        ".unparseable{color:#a60}.ungraded{color:#a0a}")


def _token_span(piece: str, category: int, steered: bool, names) -> str:
    """One token's text, on its category's colour with the name on hover when it was steered."""
    text = html.escape(piece)
    if not (steered and category >= 0):
        return text
    return (f"<span class='s' style='background:{category_color(category)}' "
            f"title='{html.escape(str(names[category]))}'>{text}</span>")


def _answer_html(row) -> str:
    """The generated answer: token by token where the row has them (a token that adds no text,
    e.g. the first bytes of a character, gets no span), else its text."""
    if "pieces" not in row:
        return html.escape(row["output"] or "")
    return "".join(_token_span(p, c, s, row["category_names"])
                   for p, c, s in zip(row["pieces"], row["category"], row["steered"]) if p)


def _problem_html(row) -> str:
    grade = grade_label(row)
    why = f" title='{html.escape(row['grade_error'])}'" if row.get("grade_error") else ""
    extracted = "(none)" if row["extracted"] is None else row["extracted"]
    question = row.get("question", "(not recorded in this row)")
    return (f"<div class='trace' data-problem='{html.escape(str(row['problem']))}'>"
            f"<div><b>question</b> {html.escape(question)}</div>"
            f"<div class='answer tok'>{_answer_html(row)}</div>"
            f"<div><b>gold</b> {html.escape(str(row['gold']))} &middot; <b>extracted</b> "
            f"{html.escape(str(extracted))} &middot; <b class='{grade}'{why}>{grade}</b></div></div>")


def _legend_html(names) -> str:
    spans = "".join(f"<span style='background:{category_color(j)}'>{html.escape(str(n))}</span>"
                    for j, n in enumerate(names))
    return f"<div class='legend'>{spans}</div>"


def trace_viewer_html(groups: dict, title: str = "hybridfast traces") -> str:
    """``groups[heading] = [row, ...]`` (module doc: the fields) -> one self-contained HTML page,
    a section per heading with its category legend where its rows carry categories."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, rows in groups.items():
        out.append(f"<h2>{html.escape(heading)}</h2>")
        named = [r["category_names"] for r in rows if "category_names" in r]
        if named:
            out.append(_legend_html(named[0]))
        out.extend(_problem_html(r) for r in rows)
    out.append("</body></html>")
    return "".join(out)


def category_usage(rows) -> dict:
    """``{category id: [share at token position t]}``: of the rows whose answer reaches position
    ``t``, the share whose token ``t`` was steered with that category."""
    K = len(rows[0]["category_names"])
    T = max(len(r["category"]) for r in rows)
    usage = {c: [] for c in range(K)}
    for t in range(T):
        live = [r for r in rows if t < len(r["category"])]
        for c in range(K):
            usage[c].append(sum(r["steered"][t] and r["category"][t] == c for r in live) / len(live))
    return usage


def mh_acceptance(rows) -> list[float]:
    """Acceptance rate at each MH step over the chains that took part in it."""
    n = max(len(r["mh_accepted"]) for r in rows)
    steps = [[r["mh_accepted"][s] for r in rows if s < len(r["mh_accepted"])] for s in range(n)]
    return [sum(a) / len(a) for a in steps]


def _carrying(groups: dict, field: str) -> dict:
    """Each group's rows whose ``field`` is a non-empty list (the others add nothing to its chart),
    for the groups that have any."""
    kept = {label: [r for r in rows if r.get(field)] for label, rows in groups.items()}
    return {label: rows for label, rows in kept.items() if rows}


def _category_usage_svg(groups: dict) -> str:
    panels = []
    for label, rows in groups.items():
        names = rows[0]["category_names"]
        usage = category_usage(rows)
        panels.append(lines_svg({names[c]: ys for c, ys in usage.items()},
                                f"{label}: steered category by token position (share of answers that reach it)",
                                "generated token position", ymax=1.0, colors=[category_color(c) for c in usage]))
    return stack_svg(panels)


def _write(path: Path, text: str) -> None:
    """UTF-8 whatever the locale: the page and the charts declare it, and hold any character."""
    path.write_text(text, encoding="utf-8")


def write_views(folder, summary, rows) -> str:
    """Write ``accuracy.svg`` and ``traces.html`` into ``folder``, plus ``category_usage.svg`` when
    rows carry per-token categories and ``acceptance.svg`` when rows carry MH acceptances; returns
    the markdown that links them."""
    folder = Path(folder)
    groups = sections(rows, summary)
    _write(folder / "accuracy.svg", bar_svg({label: e["accuracy"] for label, e in summary["methods"].items()},
                                            "accuracy by method"))
    _write(folder / "traces.html", trace_viewer_html(groups))
    links = ["![accuracy](accuracy.svg)"]
    steered = _carrying(groups, "category")
    if steered:
        _write(folder / "category_usage.svg", _category_usage_svg(steered))
        links.append("![category usage](category_usage.svg)")
    mh = {label: mh_acceptance(rs) for label, rs in _carrying(groups, "mh_accepted").items()}
    if mh:
        _write(folder / "acceptance.svg", lines_svg(mh, "MH acceptance rate by step (chains still running)",
                                                    "MH step (all blocks)", ymax=1.0))
        links.append("![MH acceptance](acceptance.svg)")
    links.append("[trace viewer: question, answer, gold and grade of every problem](traces.html)")
    return "\n".join(links) + "\n"
