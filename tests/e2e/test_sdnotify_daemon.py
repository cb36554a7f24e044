"""A real daemon under a fake systemd: READY=1, WATCHDOG=1 pings, STATUS= and STOPPING=1 arrive
on an AF_UNIX datagram socket passed as NOTIFY_SOCKET, as systemd's Type=notify expects."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Lab

pytestmark = pytest.mark.e2e


def _receive_until(sock: socket.socket, stop: str, timeout_s: float) -> list[tuple[float, str]]:
    """(arrival time, datagram) pairs up to and including the first datagram holding `stop`."""
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append((time.monotonic(), data))
        if stop in data.split("\n"):
            return got
    raise AssertionError(f"no {stop} within {timeout_s} s; got {[d for _, d in got]}")


def _receive_for(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append((time.monotonic(), sock.recv(4096).decode()))
        except socket.timeout:
            break
    return got


def test_daemon_notifies_ready_watchdog_status_and_stopping(lab: Lab, tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_socket = str(tmp_path / "notify.sock")
    sock.bind(notify_socket)
    lab.submit("sleepy", "seconds=30")
    env = {**lab.env(), "NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "1000000"}
    log = open(lab.root / "daemon.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                             str(lab.config), "daemon"], stdout=log, stderr=log, env=env,
                            cwd=lab.root, start_new_session=True)
    try:
        ready = _receive_until(sock, "READY=1", 20)
        assert not any("WATCHDOG=1" in d for _, d in ready[:-1])   # READY comes first
        assert "STATUS=1 queued, 0 held, 0 running" in ready[-1][1].split("\n")
        pings = _receive_for(sock, 2.6)
        watchdog_at = [t for t, d in pings if "WATCHDOG=1" in d.split("\n")]
        # Every half of WATCHDOG_USEC (0.5 s) give or take a 0.1 s tick: 4-6 pings in 2.6 s.
        assert 4 <= len(watchdog_at) <= 6, pings
        assert max(b - a for a, b in zip(watchdog_at, watchdog_at[1:])) < 0.8
        statuses = [ln for _, d in pings for ln in d.split("\n") if ln.startswith("STATUS=")]
        assert statuses == ["STATUS=0 queued, 0 held, 1 running"], statuses
        proc.send_signal(signal.SIGTERM)
        stopping = _receive_until(sock, "STOPPING=1", 10)
        assert "STATUS=stopping: 0 queued, 0 held, 1 running" in stopping[-1][1].split("\n")
        proc.send_signal(signal.SIGTERM)       # second one: cold shutdown, exit now
        assert proc.wait(timeout=20) == 0
        assert not any("STOPPING=1" in d for _, d in _receive_for(sock, 0.2))  # sent once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        sock.close()
