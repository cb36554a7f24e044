"""Tail an append-only file by offset: worker events (events.jsonl) and output of runs whose
worker writes on another machine (Slurm), read over the shared filesystem.

The worker owns the run folder, so the file is untrusted: it is opened O_NOFOLLOW|O_NONBLOCK
under an O_NOFOLLOW folder fd and read only if it is a regular file (a FIFO, a device or a link
is refused once, with the reason); at most READ_BUDGET_BYTES are read per call, and a line
longer than the tail's cap is dropped (jobs.contract.lines). A trailing partial line is held
until its newline arrives (a reader on NFS may see a write in pieces). The files are never
rotated: a file shorter than what was read was truncated by someone else, and is read again
from its start.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from jobs.contract import protocol
from jobs.contract.lines import Dropped, LineSplitter
from lab_attendant.service.logsetup import get_logger

READ_CHUNK = 1 << 20
READ_BUDGET_BYTES = 4 << 20              # per file per call: a huge file is read over many ticks
log = get_logger("lab_attendant.executors.eventfile")


@dataclass(frozen=True)
class Refused:
    """The file is there but is not read, and why (reported once per reason)."""
    reason: str


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class FileTail:
    def __init__(self, path: Path, offset: int = 0, *,
                 max_line_bytes: int = protocol.MAX_LINE_BYTES,
                 budget_bytes: int = READ_BUDGET_BYTES) -> None:
        self.path = path
        self._pos = offset               # bytes read from the file
        self._lines = LineSplitter(max_line_bytes)
        self.budget_bytes = budget_bytes
        self._refused: str | None = None  # the last refusal reported

    @property
    def offset(self) -> int:
        """Bytes consumed: just past a newline (or 0), unless inside a dropped line."""
        return self._pos - self._lines.pending_bytes

    def _open(self) -> int | Refused | None:
        """A read fd on the file; Refused; None when it does not exist (yet)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            dir_fd = os.open(self.path.parent, flags | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Refused(f"{self.path.parent} cannot be opened as a plain folder ({exc.strerror})")
        try:
            fd = os.open(self.path.name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Refused(f"{self.path} is a symbolic link, not read (only a regular file "
                               "the worker appends to is)")
            return Refused(f"{self.path} cannot be opened ({exc.strerror})")
        finally:
            os.close(dir_fd)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            return Refused(f"{self.path} is {what}, not read (only a regular file the worker "
                           "appends to is)")
        return fd

    def read(self, *, final: bool = False) -> list[bytes | Dropped | Refused]:
        """Complete lines appended since the last call (Dropped for an over-long one, Refused
        once when the file is not one we read); with `final`, the unterminated rest too (the
        writer has ended)."""
        fd = self._open()
        if fd is None:
            return []                    # the worker has not written yet
        if isinstance(fd, Refused):
            if fd.reason == self._refused:
                return []
            self._refused = fd.reason
            log.warning("not reading a run file", reason=fd.reason)
            return [fd]
        self._refused = None
        try:
            size = os.fstat(fd).st_size
            if size < self._pos:
                log.warning("append-only file shrank; reading it again from the start",
                            path=str(self.path), offset=self._pos, size=size)
                self._pos = 0
                self._lines = LineSplitter(self._lines.max_line_bytes)
            out: list[bytes | Dropped | Refused] = []
            budget = self.budget_bytes
            while budget > 0:
                data = os.pread(fd, min(READ_CHUNK, budget), self._pos)
                if not data:
                    break
                self._pos += len(data)
                budget -= len(data)
                out.extend(self._lines.feed(data))
        finally:
            os.close(fd)
        if final and self._lines.pending_bytes:
            out.append(self._lines.rest())
        return out

    def read_lines(self, *, final: bool = False) -> list[bytes]:
        """read() for a log: a dropped or refused file or line becomes a line saying so."""
        return [ln if isinstance(ln, bytes) else
                f"[lab-attendant: {ln.reason if isinstance(ln, Refused) else ln.sentence('an output')}]"
                .encode() for ln in self.read(final=final)]


def read_events(tail: FileTail, *, final: bool = False) -> list[protocol.Event | protocol.Rejected]:
    """Decoded events from an events.jsonl tail (Rejected for a line that is not a valid event,
    an over-long one, or a file that is not read; empty lines are skipped)."""
    out: list[protocol.Event | protocol.Rejected] = []
    for line in tail.read(final=final):
        if isinstance(line, Refused):
            out.append(protocol.Rejected(line.reason, b""))
        elif isinstance(line, Dropped):
            out.append(protocol.Rejected(line.sentence("event"), line.head))
        elif line.strip():
            out.append(protocol.decode(line))
    return out
