"""Worker events are decoded and checked once, in jobs.contract.protocol: one dataclass per kind,
finite numbers, integers that fit SQLite's int64, field types and sizes; a bad line becomes a
Rejected with its reason, which the daemon logs while the run goes on."""
from __future__ import annotations

import json

import pytest

from jobs.contract import protocol
from lab_attendant.store.states import RunState
from tests.unit.fakes import submit


def _line(**obj) -> bytes:
    return json.dumps(obj).encode()


def test_each_event_kind_decodes_to_its_dataclass():
    assert protocol.decode(protocol.encode(protocol.STARTED, pid=3, kind="probe")) == \
        protocol.Started(t=pytest.approx(0, abs=1e12), pid=3, kind="probe")
    assert protocol.decode(_line(event="progress", t=1.5, done=2, total=5, unit="notes")) == \
        protocol.Progress(1.5, 2, 5, "notes")
    assert protocol.decode(_line(event="metric", metrics={"a": 1, "b": [0.5, "x", None]})) == \
        protocol.Metric(None, {"a": 1, "b": [0.5, "x", None]})
    assert protocol.decode(_line(event="heartbeat")) == protocol.Heartbeat(None)
    assert protocol.decode(_line(event="result", path="/r")) == protocol.Result(None, "/r")
    assert protocol.decode(_line(event="warning", message="w")) == protocol.WorkerWarning(None, "w")
    err = protocol.decode(_line(event="error", type="OutOfMemoryError", message="m",
                                oom_kind="cuda", requested_bytes=1 << 30))
    assert isinstance(err, protocol.WorkerError) and err.get("type") == "OutOfMemoryError"
    assert err.get("requested_bytes") == 1 << 30 and err.details["oom_kind"] == "cuda"


def test_a_progress_phase_is_a_short_label_with_control_characters_stripped():
    ev = protocol.decode(_line(event="progress", done=3, total=6, unit="notes",
                               phase="reading\x1b[2J notes\u009b\n"))
    assert ev == protocol.Progress(None, 3, 6, "notes", "reading [2J notes")
    assert protocol.decode(_line(event="progress", done=1, total=2, phase="\x07")).phase is None
    assert protocol.decode(_line(event="progress", done=1, total=2)).phase is None


@pytest.mark.parametrize("line, reason", [
    (b"not json", "not a JSON line"),
    (_line(event="bogus"), "not an event"),
    (b"[1, 2]", "not an event"),
    (b'{"event": "progress", "done": NaN}', "done must be a whole number"),
    (b'{"event": "metric", "metrics": {"tokens_per_s": Infinity}}', "must be a finite number"),
    (b'{"event": "progress", "t": NaN}', "t must be a finite number"),
    (_line(event="progress", done=2**63), "does not fit a 64-bit integer"),
    (_line(event="metric", metrics={"bytes": -(2**63) - 1}), "does not fit a 64-bit integer"),
    (_line(event="progress", done="2"), "done must be a whole number"),
    (_line(event="progress", done=True), "done must be a whole number"),
    (_line(event="result"), "path must be text"),
    (_line(event="result", path="x" * (protocol.MAX_TEXT_CHARS + 1)), "characters long"),
    (_line(event="metric", metrics=[1]), "metrics must be an object"),
    (_line(event="metric", metrics={str(i): i for i in range(protocol.MAX_METRICS + 1)}),
     f"more than {protocol.MAX_METRICS} values"),
    (_line(event="heartbeat", pad="x" * protocol.MAX_LINE_BYTES), "bytes (at most"),
    (_line(event="progress", done=1, total=2, phase=3), "phase must be text"),
    (_line(event="progress", done=1, total=2, phase="p" * (protocol.MAX_PHASE_CHARS + 1)),
     "phase is 81 characters long"),
])
def test_bad_lines_are_rejected_with_a_reason(line: bytes, reason: str):
    got = protocol.decode(line)
    assert isinstance(got, protocol.Rejected) and reason in got.reason, got
    assert len(got.line) <= 200


def test_the_daemon_logs_a_rejected_event_and_the_run_goes_on(loop):
    d, launcher, _ = loop()
    rid = submit(d)
    d.tick()
    launcher.emit(rid, protocol.STARTED)
    launcher.events[rid].append(protocol.decode(b'{"event": "progress", "done": 1e999}'))
    launcher.emit(rid, protocol.PROGRESS, done=1, total=2)
    d.tick()
    run = d.store.get(rid)
    assert run.state is RunState.RUNNING and (run.progress_done, run.progress_total) == (1, 2)
    launcher.finish(rid, protocol.EXIT_OK, result="/r")
    d.tick()
    assert d.store.get(rid).state is RunState.SUCCEEDED
