"""Retries end to end: a real daemon retries a crashing run once after its back-off, links the
two, and stops there; a run lost to a daemon SIGKILL is retried by the next daemon."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import Lab, wait_for, write_config

pytestmark = pytest.mark.e2e


def _runs(lab: Lab) -> list[dict]:
    return sorted(json.loads(lab.cli("list", "--json").stdout), key=lambda r: r["id"])


def test_a_failing_run_is_retried_once_then_left_failed(lab: Lab):
    write_config(lab.root, extra="[retries]\nbase_s = 0.5\n")
    daemon = lab.start_daemon()
    first = lab.submit("crash", extra=("--retries", "1"))
    wait_for(lambda: len(_runs(lab)) == 2 and all(r["state"] == "failed" for r in _runs(lab)),
             30, "the run and its one retry to fail")
    time.sleep(1.5)                                   # more than the back-off: no third attempt
    a, b = _runs(lab)
    assert len(_runs(lab)) == 2 and a["id"] == first and b["retry_of"] == first
    assert b["attempt"] == 2 and b["started_at"] - a["ended_at"] >= 0.5
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0


def test_a_run_lost_to_a_daemon_kill_is_retried_by_the_next_daemon(lab: Lab):
    write_config(lab.root, extra="[retries]\nbase_s = 0.1\n")
    daemon = lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=30", extra=("--retries", "2"))
    lab.wait_state(rid, {"running"})
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait(timeout=10)
    lab.start_daemon()
    retried = wait_for(lambda: [r for r in _runs(lab) if r["retry_of"] == rid], 30,
                       "the lost run's retry")
    assert lab.state(rid) == "lost" and len(retried) == 1
    lab.wait_state(retried[0]["id"], {"running"})
