"""A choice's text as its tokens arrive, cut at the first stop string.

Tokens are decoded from the start of the choice each time (``skip_special_tokens=True``, so EOS
never shows), and only text that can no longer change is released: a trailing partial UTF-8
character (decoded as U+FFFD) and a trailing piece that could begin a stop string are held back
until the next tokens, or the end, decide them. So the released pieces concatenate to the final
text. A stop string ends the choice: its text is everything before the stop string, and its
tokens end with the token that completed it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Piece", "TextStream"]


@dataclass
class Piece:
    """New text and new token ids of a choice; ``finish_reason`` when this piece ends it
    (``stop``: EOS or a stop string, ``length``: max_tokens)."""
    text: str
    tokens: list
    finish_reason: str | None = None


class TextStream:
    """The text of one choice; see the module docstring."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list = []
        self.text = ""                 #: the text released so far
        self.finish_reason: str | None = None

    def feed(self, tokens: list, finish_reason: str | None = None) -> Piece:
        """Add ``tokens`` (``finish_reason``: the generation ended with them); returns what is
        now released. After the choice ended, further tokens are ignored."""
        if self.finish_reason is not None:
            return Piece("", [])
        start = len(self.ids)
        self.ids += tokens
        text = self._decode(self.ids)
        cut = self._stop_at(text)
        if cut is not None:
            k = next(k for k in range(start + 1, len(self.ids) + 1)
                     if self._stop_at(self._decode(self.ids[:k])) is not None)
            self.ids = self.ids[:k]
            return self._release(text[:cut], self.ids[start:], "stop")
        if finish_reason is not None:
            return self._release(text, tokens, finish_reason)
        return self._release(text[: self._settled(text)], tokens, None)

    def _decode(self, ids: list) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts in ``text`` (searching the unreleased part)."""
        hits = [i for i in (text.find(s, len(self.text)) for s in self.stop) if i >= 0]
        return min(hits, default=None)

    def _settled(self, text: str) -> int:
        """The length of ``text``'s prefix that no later token can change."""
        end = len(text)
        while end > len(self.text) and text[end - 1] == "\ufffd":
            end -= 1
        hold = max((j for s in self.stop for j in range(1, min(len(s) - 1, end - len(self.text)) + 1)
                    if text[end - j: end] == s[:j]), default=0)
        return max(end - hold, len(self.text))

    def _release(self, text: str, tokens: list, finish_reason: str | None) -> Piece:
        piece = Piece(text[len(self.text):], list(tokens), finish_reason)
        self.text = text if len(text) > len(self.text) else self.text
        self.finish_reason = finish_reason
        return piece
