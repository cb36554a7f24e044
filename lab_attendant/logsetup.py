"""structlog setup: JSON lines in logs/lab_attendant.log, readable console output, and the
isolated logs/experimental_paging.log that alone receives anything from paging runs (FEAT-031).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import structlog

MAIN_LOG = "lab_attendant.log"
PAGING_LOG = "experimental_paging.log"
PAGING_LOGGER = "experimental_paging"   # not under "lab_attendant": never reaches the main file

_SHARED = [
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


def setup_logging(logs_dir: Path, *, console: bool = True, level: int = logging.INFO) -> None:
    """Idempotent: replaces the handlers of our two loggers."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    (logs_dir / "runs").mkdir(exist_ok=True)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    json_renderer = structlog.processors.JSONRenderer()
    for name, filename, with_console in (("lab_attendant", MAIN_LOG, console),
                                         (PAGING_LOGGER, PAGING_LOG, False)):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level)
        logger.propagate = False
        logger.addHandler(_handler(logging.FileHandler(logs_dir / filename), json_renderer))
        if with_console:
            logger.addHandler(_handler(logging.StreamHandler(sys.stderr),
                                       structlog.dev.ConsoleRenderer(colors=False)))


def get_logger(name: str = "lab_attendant") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


def log_for(needs_paging: bool, module: str = "lab_attendant") -> structlog.stdlib.BoundLogger:
    """Everything about a paging run is logged to the paging log only."""
    return structlog.get_logger(PAGING_LOGGER if needs_paging else module)


class RunOutput:
    """Where a worker's stdout/stderr lines go: logs/runs/<id>.log for ordinary runs, JSON lines
    tagged with run_id in experimental_paging.log for paging runs."""

    def __init__(self, logs_dir: Path, run_id: int, needs_paging: bool) -> None:
        self.run_id = run_id
        self.needs_paging = needs_paging
        self.path = logs_dir / (PAGING_LOG if needs_paging else f"runs/{run_id}.log")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab", buffering=0)  # O_APPEND: whole-line writes interleave safely

    def write_lines(self, lines: list[bytes]) -> None:
        if not lines:
            return
        if self.needs_paging:
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            data = b"".join(json.dumps({"event": "worker_output", "run_id": self.run_id,
                                        "line": ln.decode("utf-8", "replace"),
                                        "timestamp": now}).encode() + b"\n" for ln in lines)
        else:
            data = b"".join(ln + b"\n" for ln in lines)
        self._fh.write(data)

    def close(self) -> None:
        self._fh.close()


def read_run_log(logs_dir: Path, run_id: int, needs_paging: bool) -> list[str]:
    """The lines of one run's output, from whichever file holds them."""
    if not needs_paging:
        path = logs_dir / "runs" / f"{run_id}.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []
    path = logs_dir / PAGING_LOG
    out = []
    if path.exists():
        for raw in path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if obj.get("event") == "worker_output" and obj.get("run_id") == run_id:
                out.append(obj["line"])
    return out
