"""structlog setup: JSON lines in logs/lab_attendant.log, readable console output, and the
isolated logs/experimental_paging.log that alone receives anything from paging runs (FEAT-031).

Rotation: several processes append to the two files, but only the daemon (one per state dir)
rotates them, by size. CLI processes open them lazily and append with O_APPEND, never rotating; a
CLI that was writing while the daemon rotated finishes its lines in <name>.1, nothing is lost.
"""
from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path
from typing import Any

import structlog

MAIN_LOG = "lab_attendant.log"
PAGING_LOG = "experimental_paging.log"
PAGING_LOGGER = "experimental_paging"   # not under "lab_attendant": never reaches the main file

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _handler(handler: logging.Handler, renderer: Any) -> logging.Handler:
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=_SHARED))
    return handler


# journald reads a "<N>" syslog priority prefix off each stderr line (SyslogLevelPrefix=).
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def under_journald() -> bool:
    """systemd started us (INVOCATION_ID) or stderr is a journal stream (JOURNAL_STREAM)."""
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


class JournalRenderer:
    """Console lines for journald: no timestamp (the journal adds its own), priority prefix."""

    def __init__(self) -> None:
        self._console = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        event_dict.pop("timestamp", None)
        priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level", "info")), 6)
        return f"<{priority}>" + self._console(logger, name, event_dict)


def _file_handler(path: Path, max_bytes: int, backup_count: int) -> logging.Handler:
    if max_bytes > 0 and backup_count > 0:
        return logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes,
                                                    backupCount=backup_count)
    return logging.FileHandler(path, delay=True)   # opened on first line: a short CLI holds no fd


def setup_logging(logs_dir: Path, *, console: bool = True, level: int = logging.INFO,
                  max_bytes: int = 0, backup_count: int = 0) -> None:
    """Idempotent: replaces the handlers of our two loggers. Only the daemon passes max_bytes
    (rotation); everyone else appends."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    (logs_dir / "runs").mkdir(exist_ok=True)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    json_renderer = structlog.processors.JSONRenderer()
    console_renderer = (JournalRenderer() if under_journald()
                        else structlog.dev.ConsoleRenderer(colors=False))
    for name, filename, with_console in (("lab_attendant", MAIN_LOG, console),
                                         (PAGING_LOGGER, PAGING_LOG, False)):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level)
        logger.propagate = False
        logger.addHandler(_handler(_file_handler(logs_dir / filename, max_bytes, backup_count),
                                   json_renderer))
        if with_console:
            logger.addHandler(_handler(logging.StreamHandler(sys.stderr), console_renderer))


def get_logger(name: str = "lab_attendant") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


def log_for(needs_paging: bool, module: str = "lab_attendant") -> structlog.stdlib.BoundLogger:
    """Everything about a paging run is logged to the paging log only."""
    return structlog.get_logger(PAGING_LOGGER if needs_paging else module)


class RunOutput:
    """Where a worker's stdout/stderr lines go: logs/runs/<id>.log for ordinary runs, JSON lines
    tagged with run_id in experimental_paging.log for paging runs (through the paging logger, so
    they count towards, and follow, that file's rotation)."""

    def __init__(self, logs_dir: Path, run_id: int, needs_paging: bool) -> None:
        self.run_id = run_id
        self.needs_paging = needs_paging
        self.path = logs_dir / (PAGING_LOG if needs_paging else f"runs/{run_id}.log")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None if needs_paging else open(self.path, "ab", buffering=0)  # O_APPEND
        self._log = structlog.get_logger(PAGING_LOGGER).bind(run_id=run_id)

    def write_lines(self, lines: list[bytes]) -> None:
        if self._fh is None:
            for ln in lines:
                self._log.info("worker_output", line=ln.decode("utf-8", "replace"))
        elif lines:
            self._fh.write(b"".join(ln + b"\n" for ln in lines))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def rotated_files(path: Path) -> list[Path]:
    """`path` and its rotated copies (<name>.1 ... <name>.N), oldest first."""
    backups = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(backups, key=lambda p: -int(p.suffix[1:])) + ([path] if path.exists() else [])


def read_run_log(logs_dir: Path, run_id: int, needs_paging: bool, *,
                 max_bytes: int | None = None) -> list[str]:
    """The lines of one run's output, from whichever file holds them (rotated ones included).
    With `max_bytes`, only that much of the files' ends is read (a tail: the dashboard reads it
    per request, and a run can print gigabytes); a line cut at the start is dropped."""
    if not needs_paging:
        return _tail_text(logs_dir / "runs" / f"{run_id}.log", max_bytes).splitlines()
    out: list[str] = []
    budget = max_bytes
    for path in reversed(rotated_files(logs_dir / PAGING_LOG)):   # newest first
        if budget is not None and budget <= 0:
            break
        text = _tail_text(path, budget)
        if budget is not None:
            budget -= len(text.encode())
        mine = []
        for raw in text.splitlines():
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if obj.get("event") == "worker_output" and obj.get("run_id") == run_id:
                mine.append(obj["line"])
        out = mine + out
    return out


def _tail_text(path: Path, max_bytes: int | None) -> str:
    """The last `max_bytes` of a regular file (all of it for None), from its first whole line;
    '' when it does not exist. Opened without following a link, and never a FIFO or device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:   # a symlink (to /dev/zero, to the store): not a run's log
            return ""
        raise
    with open(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        start = 0 if max_bytes is None else max(0, st.st_size - max_bytes)
        fh.seek(start)
        data = fh.read(st.st_size - start)
    if start > 0:
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", "replace")
