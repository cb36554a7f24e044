"""Worker -> supervisor event lines, imported by both sides (stdlib only).

A worker writes one JSON object per line to the pipe fd named by $LAB_ATTENDANT_EVENT_FD (local
runs), or appends it to the file named by $LAB_ATTENDANT_EVENT_FILE (runs on another machine, e.g.
Slurm: events.jsonl in the run folder on the shared filesystem, tailed by the supervisor).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

EVENT_FD_ENV = "LAB_ATTENDANT_EVENT_FD"
EVENT_FILE_ENV = "LAB_ATTENDANT_EVENT_FILE"

# Event names, in the order a healthy run emits them (progress/metric/heartbeat repeat).
STARTED = "started"
PROGRESS = "progress"      # {"done": int, "total": int, "unit": str}
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


def decode(line: bytes | str) -> dict[str, Any] | None:
    """Parse one event line; None for a line that is not a well-formed event (never raises)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("event") not in EVENTS:
        return None
    return obj


class LineBuffer:
    """Accumulates bytes read from a non-blocking pipe and yields complete decoded events."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            ev = decode(line)
            if ev is not None:
                yield ev


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
