"""`python -m jobs.worker SPEC`: read the spec, run the kind's function, report events on the
supervisor's pipe, write result.json atomically. Never touches the SQLite store.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from jobs.contract import protocol
from jobs.contract.atomic import write_atomic
from jobs.contract.confine import Roots
from jobs.contract.errors import SpecError
from jobs.contract.oom import oom_details, oom_kind
from jobs.contract.protocol import EventWriter
from jobs.contract.spec import RunSpec

log = logging.getLogger("jobs.worker")


class Terminated(BaseException):
    """SIGTERM arrived: unwind (finally blocks run, no partial output is renamed into place)."""


class Context:
    """What a job kind gets besides its params: output dir, progress/metric reporting, the model."""

    def __init__(self, spec: RunSpec, events: EventWriter) -> None:
        self.spec = spec
        self.run_id = spec.run_id
        self.output_dir = Path(spec.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(spec.models_dir)
        self.state_dir = Path(spec.state_dir)
        self.events = events
        self.log = logging.getLogger(f"jobs.{spec.kind}")
        self.roots = Roots(spec.allowed_roots, self.warn)   # every param file read goes through it

    def warn(self, message: str) -> None:
        """A warning event (the run's `show` lists it) and a log line."""
        self.log.warning("%s", message)
        self.events.emit(protocol.WARNING, message=message)

    def model(self, batch_size: int):
        """Open the run's model (spec.model) through the engine; reports engine metrics."""
        if self.spec.model is None:
            raise SpecError(f"kind '{self.spec.kind}' asked for a model but its spec has none")
        from jobs.lib.llm import Engine  # torch: imported only by kinds that use a model
        return Engine(self, self.spec.model, batch_size=batch_size)

    def progress(self, done: int, total: int, unit: str = "items", phase: str | None = None) -> None:
        """`phase` labels a stage whose count starts afresh ("reading notes", "themes"), so a
        reader sees "themes 1/2" rather than a bar jumping back to 0 %."""
        fields = {"phase": phase} if phase else {}
        self.events.emit(protocol.PROGRESS, done=done, total=total, unit=unit, **fields)

    def metric(self, **metrics: Any) -> None:
        self.events.emit(protocol.METRIC, metrics=metrics)

    def write_text(self, name: str, text: str) -> Path:
        return write_atomic(self.output_dir / name, text.encode())

    def write_json(self, name: str, obj: Any) -> Path:
        return write_atomic(self.output_dir / name,
                            (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _heartbeat(events: EventWriter, interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            events.emit(protocol.HEARTBEAT)
        except BrokenPipeError:
            # The supervisor is gone and will not adopt this run: stop, like a cancel would.
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise Terminated(f"received {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    events = EventWriter()
    if len(argv) != 1:
        print("usage: python -m jobs.worker SPEC.json", file=sys.stderr)
        return protocol.EXIT_BAD_SPEC
    try:
        spec = RunSpec.read(Path(argv[0]))
    except SpecError as exc:
        message = f"bad spec {argv[0]}: {exc}"
        print(message, file=sys.stderr)
        events.emit(protocol.ERROR, type="SpecError", message=message)
        return protocol.EXIT_BAD_SPEC
    signal.signal(signal.SIGTERM, _on_sigterm)
    events.emit(protocol.STARTED, pid=os.getpid(), python=sys.executable, kind=spec.kind)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, daemon=True,
                     args=(events, spec.heartbeat_interval_s, stop)).start()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.function)
        ctx = Context(spec, events)
        result = fn(spec.params, ctx) or {}
        path = ctx.write_json("result.json", result)
        events.emit(protocol.RESULT, path=str(result.get("result_path") or path))
        return protocol.EXIT_OK
    except Terminated as exc:
        events.emit(protocol.ERROR, type="Terminated", message=str(exc))
        return 128 + signal.SIGTERM
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then re-coded
        if not getattr(exc, "quiet", False):   # an expected failure says it all in its message
            traceback.print_exc()
        fields: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)[:2000]}
        if oom_kind(exc) is not None:
            fields.update(oom_details(exc))
            events.emit(protocol.ERROR, **fields)
            return protocol.EXIT_OOM
        events.emit(protocol.ERROR, **fields)
        return protocol.EXIT_ERROR
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
