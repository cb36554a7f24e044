"""A hostile worker (issue #31, items 2 and 3), with the real daemon, real workers (fixture kinds,
not the model), real SQLite and real processes: it cannot write the store or another run's files
(Landlock), a row naming someone else's process does not get it killed, and a worker that floods
its pipes without newlines neither grows the daemon nor stops its run."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import psutil
import pytest

from jobs.contract.sandbox import landlock_abi
from lab_attendant.executors.workerfence import RUN_MARKER_ENV
from tests.conftest import Lab

from .conftest import pid_alive

pytestmark = pytest.mark.faults
ENDED = {"succeeded", "failed", "cancelled", "timed_out", "oom", "lost", "killed_thermal"}
LANDLOCK_ABI, NO_LANDLOCK = landlock_abi()
NEEDS_LANDLOCK = pytest.mark.skipif(LANDLOCK_ABI == 0, reason=f"no Landlock here: {NO_LANDLOCK}")


def db(lab: Lab) -> sqlite3.Connection:
    return sqlite3.connect(lab.state_dir / "lab_attendant.sqlite3", timeout=30)


def result(lab: Lab, run_id: int) -> dict:
    return json.loads((lab.state_dir / "runs" / str(run_id) / "output" / "result.json").read_text())


def victim(**kw) -> subprocess.Popen:
    """Someone else's process: a real `sleep` leading its own group."""
    return subprocess.Popen(["sleep", "120"], start_new_session=True, **kw)


@NEEDS_LANDLOCK
def test_a_worker_cannot_write_the_store_or_another_runs_files(lab: Lab):
    """The issue's reproduction from inside a worker: the UPDATE is refused by the kernel, as
    are another run's events file and the state folder; its own folders stay writable."""
    target = victim()
    try:
        lab.start_daemon()
        other = lab.submit("sleepy", "seconds=0.2", "quiet=true")
        lab.wait_state(other, {"succeeded"})
        other_dir = lab.state_dir / "runs" / str(other)
        rid = lab.submit("tamper", f"victim_pid={target.pid}", f"other_run_dir={other_dir}")
        run = lab.wait_state(rid, ENDED)
        assert run["state"] == "succeeded", run["reason"]
        out = result(lab, rid)
        for refused in ("store", "other_run", "state_dir", "other_kind_state", "worker_folder"):
            assert out[refused].startswith("refused"), (refused, out[refused])
        assert "readonly" in out["store"] or "unable to open" in out["store"], out["store"]
        for allowed in ("own_run", "tmp", "worker_state"):
            assert out[allowed] == "written", (allowed, out[allowed])
        with db(lab) as conn:
            pid, created = conn.execute("SELECT pid, pid_create_time FROM runs WHERE id=?",
                                        (rid,)).fetchone()
        assert pid != target.pid and created is not None
        assert not (other_dir / "events.jsonl").exists()
        assert not (lab.state_dir / "planted.txt").exists()
        status = lab.cli("status").stdout
        assert f"Landlock (ABI {LANDLOCK_ABI})" in status and "NOT SANDBOXED" not in status
    finally:
        target.kill()
        target.wait()


def test_a_row_naming_another_process_does_not_get_it_killed(lab: Lab):
    """What the issue's worker wrote (state running, pid = a victim, NULL create time), written
    here directly as an unsandboxed worker could, and the same with the victim's true create
    time: the next daemon start kills neither victim's group and ends both runs `lost`."""
    plain = victim()
    timed = victim(env={**os.environ, RUN_MARKER_ENV: "/somewhere/else/runs/2"})
    try:
        daemon = lab.start_daemon()
        first = lab.submit("sleepy", "seconds=0.1", "quiet=true")
        second = lab.submit("sleepy", "seconds=0.1", "quiet=true")
        for rid in (first, second):
            lab.wait_state(rid, {"succeeded"})
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        with db(lab) as conn:     # no daemon runs now: the rows are as an attacker left them
            conn.execute("UPDATE runs SET state='running', pid=?, pid_create_time=NULL "
                         "WHERE id=?", (plain.pid, first))
            conn.execute("UPDATE runs SET state='running', pid=?, pid_create_time=? WHERE id=?",
                         (timed.pid, psutil.Process(timed.pid).create_time(), second))
        lab.start_daemon()
        for rid in (first, second):
            assert lab.wait_state(rid, ENDED)["state"] == "lost"
        time.sleep(0.3)                          # a SIGTERM sent would have landed by now
        assert pid_alive(plain.pid) and pid_alive(timed.pid)
        assert plain.poll() is None and timed.poll() is None
    finally:
        for p in (plain, timed):
            p.kill()
            p.wait()


def test_a_48_mib_line_on_the_worker_pipes_is_dropped_and_the_run_goes_on(lab: Lab):
    """48 MiB without a newline on the event pipe and on stdout: each line is dropped once it
    passes its cap (one recorded event, one log line), the events after it are read, the run
    succeeds and the daemon's RSS grows by far less than the line."""
    daemon = lab.start_daemon()
    warm = lab.submit("sleepy", "seconds=0.1", "quiet=true")   # the daemon's steady state
    lab.wait_state(warm, {"succeeded"})
    before = psutil.Process(daemon.pid).memory_info().rss
    rid = lab.submit("flood", "size_bytes=48MiB")
    run = lab.wait_state(rid, ENDED, timeout_s=120)
    after = psutil.Process(daemon.pid).memory_info().rss
    assert run["state"] == "succeeded", run["reason"]
    assert daemon.poll() is None
    assert run["progress"]["done"] == 1                # the event after the flood was read
    warnings = [e["reason"] for e in run["events"] if e["kind"] == "warning"]
    # One drop per over-long stretch: the worker's heartbeat thread writes its own line into the same pipe
    # while the flood is being written, which can end the flood's "line" and start another one; at most
    # five such events are recorded per run (the rest only logged).
    assert 1 <= len(warnings) <= 5, warnings
    assert all("longer than 262144 bytes dropped" in w for w in warnings), warnings
    log = (lab.logs_dir / "runs" / f"{rid}.log").read_text()
    assert "output line longer than 1048576 bytes dropped" in log and "after the flood" in log
    print(f"daemon RSS {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after a 48 MiB "
          "line on each pipe")
    assert after - before < 24 * 2**20, (before, after)


def test_without_the_sandbox_the_daemon_and_status_say_what_is_missing(lab: Lab):
    """`[worker] sandbox = false` (as a kernel without Landlock): one log line, `status` names
    the missing protection, runs still run."""
    lab.config.write_text(lab.config.read_text().replace("[worker]\n", "[worker]\nsandbox = false\n"))
    lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=0.1", "quiet=true")
    assert lab.wait_state(rid, ENDED)["state"] == "succeeded"
    status = lab.cli("status").stdout
    assert "WORKERS NOT SANDBOXED: [worker] sandbox = false" in status, status
    log = (lab.logs_dir / "lab_attendant.log").read_text()
    assert log.count("workers are not sandboxed") == 1
