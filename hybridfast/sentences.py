"""Sentence splitting of reasoning traces, with character spans (DESIGN.md section 1.1).

Rules: decimals (``3.14``), single-letter abbreviations (``E. coli``) and factorials (``5!``) never
end a sentence; runs of repeated punctuation count as one boundary; a sentence ends after
``. ! ? ;`` or a newline; sentences are stripped and kept only with at least ``min_words`` words.
Every returned span indexes the original text: ``text[s:e] == sentence``.
"""
from __future__ import annotations

import re

__all__ = ["split_sentences", "extract_thinking"]

_BOUNDARY = re.compile(r"[.!?;]+|\n+")


def _protected(text: str, i: int, j: int) -> bool:
    """Is the punctuation run ``text[i:j]`` not a sentence end?"""
    run = text[i:j]
    if run[0] == "\n":
        return False
    before = text[i - 1] if i > 0 else ""
    after = text[j] if j < len(text) else ""
    if run == "." and before.isdigit() and after.isdigit():          # decimal 3.14
        return True
    if run == "." and before.isalpha() and (i < 2 or not text[i - 2].isalnum()) and after == " ":
        return True                                                    # E. coli, J. Smith
    if run[0] == "!" and before.isalnum() and after not in ("", " ", "\n"):
        return True                                                    # 5!=120, k!/(n-k)!
    if run[0] == "!" and before.isdigit() and after in (" ",) and j + 1 < len(text) and \
            not text[j + 1].isupper():
        return True                                                    # "5! ways"
    return False


def split_sentences(text: str, min_words: int = 3) -> list[tuple[str, int, int]]:
    """Split ``text`` into ``(sentence, start, end)`` with ``text[start:end] == sentence``."""
    out = []
    start = 0
    for mt in _BOUNDARY.finditer(text):
        i, j = mt.span()
        if _protected(text, i, j):
            continue
        end = j if text[i] != "\n" else i
        _emit(text, start, end, min_words, out)
        start = j
    _emit(text, start, len(text), min_words, out)
    return out


def _emit(text, s, e, min_words, out):
    seg = text[s:e]
    stripped = seg.strip()
    if not stripped:
        return
    off = s + (len(seg) - len(seg.lstrip()))
    if len(stripped.split()) >= min_words:
        out.append((stripped, off, off + len(stripped)))


def extract_thinking(response: str) -> str:
    """The text between ``<think>`` and ``</think>`` (or the rest when a tag is missing)."""
    s = response
    if "<think>" in s:
        s = s.split("<think>", 1)[1]
    if "</think>" in s:
        s = s.split("</think>", 1)[0]
    return s.strip()
