"""Tail an append-only file by offset: worker events (events.jsonl) and output of runs whose
worker writes on another machine (Slurm), read over the shared filesystem.

Only complete lines are returned; a trailing partial line stays unread until its newline arrives
(a reader on NFS may see a write in pieces). The files are never rotated: a file shorter than the
offset was truncated by someone else, and is read again from its start.
"""
from __future__ import annotations

import os
from pathlib import Path

from jobs.contract import protocol
from lab_attendant.service.logsetup import get_logger

READ_CHUNK = 1 << 20
log = get_logger("lab_attendant.executors.eventfile")


class FileTail:
    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset             # bytes consumed: always just past a newline (or 0)

    def read_lines(self, *, final: bool = False) -> list[bytes]:
        """Complete lines appended since the last call; with `final`, the unterminated rest too
        (the writer has ended)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []                    # the worker has not written yet
        try:
            size = os.fstat(fd).st_size
            if size < self.offset:
                log.warning("append-only file shrank; reading it again from the start",
                            path=str(self.path), offset=self.offset, size=size)
                self.offset = 0
            chunks: list[bytes] = []
            while True:
                data = os.pread(fd, READ_CHUNK, self.offset + sum(map(len, chunks)))
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        end = len(data) if final else data.rfind(b"\n") + 1
        self.offset += end
        lines = data[:end].split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()                  # the split after the last newline
        return lines


def read_events(tail: FileTail, *, final: bool = False) -> list[protocol.Event | protocol.Rejected]:
    """Decoded events from an events.jsonl tail (Rejected for a line that is not a valid event;
    empty lines are skipped)."""
    return [protocol.decode(line) for line in tail.read_lines(final=final) if line.strip()]
