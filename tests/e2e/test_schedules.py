"""Schedules in a real daemon: firings become queued or skipped runs tagged with the schedule id;
coalesced after a stall; never two runs of one schedule at once."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest

from tests.conftest import Lab, wait_for

pytestmark = pytest.mark.e2e


def _add_schedule(lab: Lab, kind: str, params: str = "{}", cron: str = "* * * * * *") -> None:
    with open(lab.config, "a") as fh:
        fh.write(f'\n[[schedules]]\nid = "every-second"\ncron = "{cron}"\nkind = "{kind}"\n'
                 f"params = {params}\n")


def _runs(lab: Lab) -> list[dict]:
    """Straight from SQLite: a CLI call takes seconds on a loaded box, too slow to watch with."""
    db = lab.state_dir / "lab_attendant.sqlite3"
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(
                "SELECT id, state, reason, submitted_at, running_at, ended_at FROM runs "
                "WHERE schedule_id = 'every-second' ORDER BY id")]
        except sqlite3.OperationalError:   # the daemon has not created the tables yet
            return []


def test_schedules_verb_lists_next_fire_time(lab: Lab):
    _add_schedule(lab, "sleepy", cron="30 2 * * *")
    out = lab.cli("schedules", "--json").stdout
    (row,) = json.loads(out)
    assert row["id"] == "every-second" and row["kind"] == "sleepy"
    assert "T02:30:00" in row["next_fire_time"]


def test_paging_schedule_with_the_flag_off_records_skipped_runs(lab: Lab):
    _add_schedule(lab, "paging_echo")
    lab.start_daemon()
    wait_for(lambda: len(_runs(lab)) >= 2, 20, "two firings")
    runs = _runs(lab)
    assert all(r["state"] == "skipped" for r in runs), runs
    assert all("experimental paging is off" in r["reason"] and "every-second" in r["reason"]
               for r in runs)


def test_one_run_per_firing_never_two_at_once_and_a_stall_coalesces(lab: Lab):
    _add_schedule(lab, "sleepy", params="{seconds = 1.5}")
    daemon = lab.start_daemon("--experimental-paging")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:   # watch: at most one open run of the schedule
        open_runs = [r for r in _runs(lab) if r["state"] in ("queued", "starting", "running")]
        assert len(open_runs) <= 1, open_runs
        time.sleep(0.2)
    runs = _runs(lab)
    assert any(r["state"] in ("succeeded", "running") for r in runs)
    skipped = [r for r in runs if r["state"] == "skipped"]
    assert skipped and all("previous run" in r["reason"] and "is still" in r["reason"]
                           for r in skipped)
    done = sorted((r["running_at"], r["ended_at"]) for r in runs if r["state"] == "succeeded")
    assert all(a[1] <= b[0] for a, b in zip(done, done[1:]))   # no overlap in time
    # Stall the daemon (and its scheduler thread) for 4 s: the missed firings coalesce into one.
    wait_for(lambda: not [r for r in _runs(lab) if r["state"] in ("queued", "starting",
                                                                   "running")], 20, "idle")
    os.kill(daemon.pid, signal.SIGSTOP)
    before = len(_runs(lab))
    time.sleep(4.0)
    os.kill(daemon.pid, signal.SIGCONT)
    wait_for(lambda: len(_runs(lab)) > before, 20, "a firing after the stall")
    time.sleep(1.0)
    after = _runs(lab)[before:]
    first = after[0]["submitted_at"]
    burst = [r for r in after if r["submitted_at"] < first + 0.9]
    # Without coalescing the ~4 missed firings would all land at once; one (plus at most the
    # next regular firing) is what coalesce=True allows.
    assert 1 <= len(burst) <= 2, burst
