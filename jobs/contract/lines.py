"""Bounded line splitting for what a worker writes (its event pipe or file, its output): memory
per reader stays under one line's cap whatever the writer sends, and each byte is copied once.

A line longer than the cap is dropped, not truncated (half an event is not an event): the
splitter reports it once, as soon as the cap is passed, and resumes after its next newline.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dropped:
    """An over-long line: at least `size_bytes` long when dropped; `head` is its start."""
    size_bytes: int
    max_line_bytes: int
    head: bytes

    def sentence(self, what: str) -> str:
        return (f"{what} line longer than {self.max_line_bytes} bytes dropped (no newline within "
                f"{self.size_bytes} bytes); reading resumes after its next newline")


class LineSplitter:
    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()          # the unterminated line so far (at most the cap)
        self._skipping = False           # inside a dropped line: discard up to its newline

    def feed(self, data: bytes) -> list[bytes | Dropped]:
        """The lines `data` completes (without their newline), and a Dropped where a line
        passes the cap."""
        out: list[bytes | Dropped] = []
        start = 0
        while start <= len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl < 0 else nl
            if self._skipping:
                if nl >= 0:
                    self._skipping = False
            elif len(self._buf) + end - start > self.max_line_bytes:
                head = bytes(self._buf[:200]) if self._buf else data[start:start + 200]
                out.append(Dropped(len(self._buf) + end - start, self.max_line_bytes, head))
                self._buf.clear()
                self._skipping = nl < 0
            elif nl >= 0:
                if self._buf:
                    self._buf += data[start:end]
                    out.append(bytes(self._buf))
                    self._buf.clear()
                else:
                    out.append(data[start:end])
            else:
                self._buf += data[start:end]
            if nl < 0:
                break
            start = nl + 1
        return out

    def rest(self) -> bytes:
        """The unterminated line so far (the writer has ended); empty inside a dropped line."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._skipping = False
        return rest

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)
