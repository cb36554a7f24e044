"""Worker -> supervisor event lines, imported by both sides (stdlib only): the worker encodes
them, the supervisor decodes each line once into one frozen dataclass per event kind (or a
Rejected with the reason).

A worker writes one JSON object per line to the pipe fd named by $LAB_ATTENDANT_EVENT_FD (local
runs), or appends it to the file named by $LAB_ATTENDANT_EVENT_FILE (runs on another machine, e.g.
Slurm: events.jsonl in the run folder on the shared filesystem, tailed by the supervisor).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from jobs.contract.lines import Dropped, LineSplitter

EVENT_FD_ENV = "LAB_ATTENDANT_EVENT_FD"
EVENT_FILE_ENV = "LAB_ATTENDANT_EVENT_FILE"

# Event names, in the order a healthy run emits them (progress/metric/heartbeat repeat).
STARTED = "started"
PROGRESS = "progress"      # {"done": int, "total": int, "unit": str, "phase": str (optional)}
METRIC = "metric"          # {"metrics": {...}} e.g. VRAM, RSS, cache hits, tokens/s
HEARTBEAT = "heartbeat"
RESULT = "result"          # {"path": str}
ERROR = "error"            # {"type": str, "message": str, ...}
WARNING = "warning"        # {"message": str}: e.g. a file skipped outside the allowed roots
EVENTS = (STARTED, PROGRESS, METRIC, HEARTBEAT, RESULT, ERROR, WARNING)

# Worker exit codes the supervisor interprets.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_SPEC = 2
EXIT_OOM = 3               # torch.OutOfMemoryError (or MemoryError) caught and reported


def encode(event: str, **fields: Any) -> bytes:
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENTS)}")
    return (json.dumps({"event": event, "t": time.time(), **fields}, default=str) + "\n").encode()


# Bounds a decoded event must keep: SQLite's INTEGER is a signed 64-bit value, and an event line
# is one write of a worker, not a data channel.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LINE_BYTES = 256 * 1024
MAX_TEXT_CHARS = 10_000          # a message, a path, a unit, an error type
MAX_METRICS = 256                # keys in one metric event (nested values count too)
MAX_PHASE_CHARS = 80             # a progress phase label ("reading notes") fits a table cell
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")   # C0/C1 controls: a label is never a terminal command


@dataclass(frozen=True)
class Started:
    t: float | None
    pid: int | None = None
    python: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class Progress:
    t: float | None
    done: int | None = None
    total: int | None = None
    unit: str | None = None
    phase: str | None = None     # what the run is doing, e.g. "reading notes", "themes"


@dataclass(frozen=True)
class Metric:
    t: float | None
    metrics: dict[str, Any] = field(default_factory=dict)   # JSON values, numbers finite


@dataclass(frozen=True)
class Heartbeat:
    t: float | None


@dataclass(frozen=True)
class Result:
    t: float | None
    path: str


@dataclass(frozen=True)
class WorkerWarning:
    t: float | None
    message: str


@dataclass(frozen=True)
class WorkerError:
    t: float | None
    type: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)   # e.g. jobs/contract/oom.py's fields

    def get(self, key: str, default: Any = None) -> Any:
        """A detail by name (type and message included), as the classifier reads them."""
        if key in ("type", "message"):
            return getattr(self, key)
        return self.details.get(key, default)


Event = Union[Started, Progress, Metric, Heartbeat, Result, WorkerWarning, WorkerError]


@dataclass(frozen=True)
class Rejected:
    """A line that is not a valid event, and why (the supervisor logs it and goes on)."""
    reason: str
    line: bytes                  # its first bytes, for the log


class _Bad(ValueError):
    pass


def _time(obj: dict[str, Any]) -> float | None:
    t = obj.get("t")
    return None if t is None else _float("t", t)


def _float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(f"{key} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or not (INT64_MIN <= v <= INT64_MAX):
        raise _Bad(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _int(key: str, v: Any, *, optional: bool = True) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{key} must be a whole number, got {type(v).__name__}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise _Bad(f"{key} = {v} does not fit a 64-bit integer")
    return v


def _opt_text(key: str, v: Any) -> str | None:
    return None if v is None else _text(key, v)


def _text(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{key} must be text, got {type(v).__name__}")
    if len(v) > MAX_TEXT_CHARS:
        raise _Bad(f"{key} is {len(v)} characters long (at most {MAX_TEXT_CHARS})")
    return v


def _label(key: str, v: Any) -> str | None:
    """A short label shown in tables: text of at most MAX_PHASE_CHARS, control characters
    stripped (and nothing left is no label)."""
    if v is None:
        return None
    text = " ".join(_CONTROL.sub(" ", _text(key, v)).split())
    if len(text) > MAX_PHASE_CHARS:
        raise _Bad(f"{key} is {len(text)} characters long (at most {MAX_PHASE_CHARS})")
    return text or None


def _value(key: str, v: Any, budget: list[int]) -> Any:
    """A metric or detail value: JSON scalars with finite numbers in int64, lists and objects
    of them; `budget` bounds how many values one event carries."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Bad(f"more than {MAX_METRICS} values")
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return _int(key, v)
    if isinstance(v, float):
        return _float(key, v)
    if isinstance(v, str):
        return _text(key, v)
    if isinstance(v, list):
        return [_value(f"{key}[{i}]", x, budget) for i, x in enumerate(v)]
    if isinstance(v, dict):
        return {str(k): _value(f"{key}.{k}", x, budget) for k, x in v.items()}
    raise _Bad(f"{key} has an unsupported type {type(v).__name__}")


def _build(obj: dict[str, Any]) -> Event:
    name, t = obj["event"], _time(obj)
    if name == STARTED:
        return Started(t, _int("pid", obj.get("pid")), _opt_text("python", obj.get("python")),
                       _opt_text("kind", obj.get("kind")))
    if name == PROGRESS:
        done, total = _int("done", obj.get("done")), _int("total", obj.get("total"))
        return Progress(t, done, total, _opt_text("unit", obj.get("unit")),
                        _label("phase", obj.get("phase")))
    if name == METRIC:
        metrics = obj.get("metrics", {})
        if not isinstance(metrics, dict):
            raise _Bad(f"metrics must be an object, got {type(metrics).__name__}")
        return Metric(t, _value("metrics", metrics, [MAX_METRICS + 1]))
    if name == HEARTBEAT:
        return Heartbeat(t)
    if name == RESULT:
        return Result(t, _text("path", obj.get("path")))
    if name == WARNING:
        return WorkerWarning(t, _text("message", str(obj.get("message"))))
    details = {k: v for k, v in obj.items() if k not in ("event", "t", "type", "message")}
    return WorkerError(t, _text("type", str(obj.get("type"))), _text("message", str(obj.get("message"))),
                       _value("details", details, [MAX_METRICS + 1]))


def decode(line: bytes | str) -> Event | Rejected:
    """One event line as its typed event, checked once here (field types, finite numbers,
    integers that fit SQLite's int64, sizes); a Rejected with the reason otherwise (never raises)."""
    raw = line.encode() if isinstance(line, str) else line
    head = raw[:200]
    if len(raw) > MAX_LINE_BYTES:
        return Rejected(f"event line of {len(raw)} bytes (at most {MAX_LINE_BYTES})", head)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return Rejected("not a JSON line", head)
    if not isinstance(obj, dict) or obj.get("event") not in EVENTS:
        what = obj.get("event") if isinstance(obj, dict) else type(obj).__name__
        return Rejected(f"not an event (event = {what!r}); known: {', '.join(EVENTS)}", head)
    try:
        return _build(obj)
    except _Bad as exc:
        return Rejected(f"bad {obj['event']} event: {exc}", head)


class LineBuffer:
    """Accumulates bytes read from a non-blocking pipe and yields complete decoded events (and
    the Rejected lines; empty lines are skipped). A line over MAX_LINE_BYTES is dropped as it
    passes the cap (one Rejected), so a writer without newlines cannot grow the reader."""

    def __init__(self) -> None:
        self._lines = LineSplitter(MAX_LINE_BYTES)

    def feed(self, data: bytes) -> Iterator[Event | Rejected]:
        for line in self._lines.feed(data):
            if isinstance(line, Dropped):
                yield Rejected(line.sentence("event"), line.head)
            elif line.strip():
                yield decode(line)


class EventWriter:
    """Worker-side writer to the pipe fd or the events file the supervisor named; a no-op sink
    when it named neither (ad-hoc runs)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            env, path = os.environ.get(EVENT_FD_ENV), os.environ.get(EVENT_FILE_ENV)
            if env:
                fd = int(env)
            elif path:
                # O_APPEND: each line lands whole at the end, wherever the file's end is now.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fd = fd

    def emit(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        data = encode(event, **fields)
        # One write per line: pipe writes <= PIPE_BUF are atomic, larger ones are looped; the
        # tailer of an events file ignores a trailing partial line until its newline arrives.
        while data:
            n = os.write(self._fd, data)
            data = data[n:]
