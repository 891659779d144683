"""Incremental text of a generated row: full re-decoding, stop strings, stable streaming pieces."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable


class RowText:
    """The growing text of one generated row. `add` decodes the whole output after each new
    token (so multi-byte characters and leading spaces come out right) and cuts at the first
    stop string; `release` hands out the part that can no longer change. With `lstrip` the text
    starts at its first non-blank character (a chat answer's leading space)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (), lstrip: bool = False) -> None:
        self._decode, self.stop, self.lstrip = decode, [s for s in stop if s], lstrip
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text, self.ids, self.emitted = "", [], 0

    def decode(self, ids: Sequence[int]) -> str:
        text = self._decode(ids)
        return text.lstrip() if self.lstrip else text

    def add(self, ids: Sequence[int]) -> bool:
        """Set the row's output ids; True when a stop string appeared (text and ids are then cut:
        ids keep the tokens whose text lies wholly before the stop)."""
        before = len(self.text)
        self.ids, self.text = list(ids), self.decode(ids)
        found = [i for i in (self.text.find(s, max(0, before - self.longest - 4)) for s in self.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        while self.ids and len(self.decode(self.ids)) > len(self.text):
            self.ids.pop()
        return True

    def release(self, final: bool = False) -> str:
        """New text that is stable: all of it when final; else hold back an unfinished
        multi-byte character (U+FFFD at the end) and a tail that may become a stop string."""
        end = len(self.text) if final else stable_end(self.text, self.stop)
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def stable_end(text: str, stop: Sequence[str]) -> int:
    """How much of a growing text can be shown: hold back an unfinished multi-byte character
    (U+FFFD at the end) and any tail that could still become a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, end), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return end - hold
