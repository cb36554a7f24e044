"""What a failing store means and what the daemon does about it: SQLite errors sorted into
"corrupt" (stop, say how to recover) and "cannot write now" (keep supervising from memory, queue
the writes that must not be lost, retry with back-off), and the status file `status` reads then.
"""
from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable

from sqlalchemy.exc import DatabaseError, OperationalError

from lab_attendant.errors import (
    StoreReadError,
    StoreUnavailable,
    StoreUnusable,
    StoreWriteError,
    TransitionError,
)
from lab_attendant.service.logsetup import get_logger

log = get_logger("lab_attendant.store.db")

# sqlite3's messages for a file that is not (or no longer) a database.
_CORRUPT = ("file is not a database", "database disk image is malformed", "file is encrypted")
# ... and for a store that is fine but cannot be written (or read) right now.
_TRANSIENT = ("database or disk is full", "disk i/o error", "readonly database",
              "unable to open database file", "database is locked", "no space left")
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0
STATUS_FILE_BYTES = 4096   # preallocated: rewriting it in place needs no free block


def recovery_hint(db_path: Path) -> str:
    return (f"stop the daemon and run `lab-attendant db restore` (puts the newest backup in its "
            f"place and keeps the damaged file beside it as {db_path.name}.corrupt-TIME), or "
            "`lab-attendant db check` to see what is wrong")


def translate(exc: DatabaseError, db_path: Path, *, writing: bool = True) -> Exception:
    """The error to raise instead of SQLAlchemy's: StoreUnusable, StoreWriteError (StoreReadError
    when not `writing`), or exc."""
    text = str(getattr(exc, "orig", exc)).lower()
    if any(m in text for m in _CORRUPT):
        return StoreUnusable(f"store {db_path} is damaged ({getattr(exc, 'orig', exc)}); "
                             + recovery_hint(db_path))
    if isinstance(exc, OperationalError) and any(m in text for m in _TRANSIENT):
        if not writing:
            return StoreReadError(f"store {db_path} cannot be read: {getattr(exc, 'orig', exc)}")
        return StoreWriteError(f"store {db_path} cannot be written: {getattr(exc, 'orig', exc)}")
    return exc


class StatusFile:
    """state_dir/daemon-status.json: the daemon's own account of a store fault, for `status`.
    Created at full size at start, then rewritten in place, so a full disk cannot refuse it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._fd, b" " * STATUS_FILE_BYTES, 0)
        except OSError as exc:
            log.warning("cannot create the daemon status file", path=str(self.path), error=str(exc))
            self._fd = None

    def write(self, status: dict[str, Any]) -> None:
        if self._fd is None:
            return
        data = json.dumps(status, default=str).encode()[:STATUS_FILE_BYTES]
        try:
            os.pwrite(self._fd, data.ljust(STATUS_FILE_BYTES), 0)
        except OSError as exc:   # read-only or I/O error: the journal and STATUS= still say it
            log.warning("cannot update the daemon status file", error=str(exc))

    def close(self) -> None:
        if self._fd is not None:
            self.write({"store_fault": None})
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_bytes().strip() or b"{}")
        except (OSError, ValueError):
            return {}


class WriteBehind:
    """The daemon's store writes. `must` writes (state changes, result paths, guard events) are
    queued in order while the store refuses them and replayed when it accepts writes again, so
    no outcome is lost; `may` writes (progress, heartbeats, readings) are dropped meanwhile."""

    def __init__(self, store: Any, clock: Callable[[], float],
                 on_change: Callable[[str | None], None]) -> None:
        self.store, self.clock, self.on_change = store, clock, on_change
        self.pending: deque[tuple[Callable[..., Any], tuple, dict]] = deque()
        self.fault: str | None = None
        self.backoff_s = BACKOFF_FIRST_S
        self.retry_at = 0.0

    def must(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`write(*args, **kwargs)` now, or queued (in order) until the store takes writes;
        `write` is a bound Store method or a function of the store (samples.save)."""
        if self.fault is None and not self.pending:
            try:
                return write(*args, **kwargs)
            except StoreUnavailable as exc:
                self.failed(exc)
        self.pending.append((write, args, kwargs))
        return None

    def may(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`write(*args, **kwargs)` now, or nothing while the store refuses writes."""
        if self.fault is not None:
            return None
        try:
            return write(*args, **kwargs)
        except StoreUnavailable as exc:
            self.failed(exc)
            return None

    def failed(self, exc: Exception) -> None:
        if self.fault is None:
            self.fault = str(exc)
            self.retry_at = self.clock() + self.backoff_s
            log.error("store fault: admissions paused, running workers stay supervised, "
                      "writes that must not be lost are kept in memory", error=self.fault)
            self.on_change(self.fault)

    def retry(self, *, force: bool = False) -> bool:
        """Replay the queue when the back-off has run out; True when the store takes writes."""
        if self.fault is None:
            return True
        if not force and self.clock() < self.retry_at:
            return False
        try:
            while self.pending:
                write, args, kwargs = self.pending[0]
                try:
                    write(*args, **kwargs)
                except TransitionError as exc:   # the table says no: log it, do not loop on it
                    log.error("queued store write refused", write=write.__qualname__,
                              error=str(exc))
                self.pending.popleft()
            self.store.set_meta("store_probe", self.clock())   # writable, not just readable
        except StoreUnavailable as exc:
            self.backoff_s = min(BACKOFF_MAX_S, self.backoff_s * 2)
            self.retry_at = self.clock() + self.backoff_s
            self.fault = str(exc)
            log.warning("store still not writable", error=self.fault, pending=len(self.pending),
                        retry_in_s=self.backoff_s)
            self.on_change(self.fault)
            return False
        log.info("store writable again: admissions resume", after_fault=self.fault)
        self.fault, self.backoff_s = None, BACKOFF_FIRST_S
        self.on_change(None)
        return True
