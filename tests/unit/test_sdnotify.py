"""Notifier against real AF_UNIX datagram sockets: abstract names, watchdog cadence, env scrub."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from lab_attendant.service.sdnotify import Notifier, status_text


def _abstract_socket() -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"lab-attendant-unit-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(2)
    return sock, "@" + name


def test_abstract_socket_name_receives_ready_and_status():
    sock, address = _abstract_socket()
    with sock:
        n = Notifier.from_env({"NOTIFY_SOCKET": address})
        n.ready("2 queued, 0 held, 0 running")
        assert sock.recv(4096) == b"READY=1\nSTATUS=2 queued, 0 held, 0 running"


def test_watchdog_every_half_interval_and_status_only_when_changed():
    sock, address = _abstract_socket()
    with sock:
        n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_interval_s == 2.0
        texts = iter(["a", "a", "b"])
        sent = []
        for now_s in (0.0, 1.0, 2.0, 3.9, 4.0):
            n.tick(now_s, lambda: next(texts))
            sock.settimeout(0.05)
            try:
                sent.append((now_s, sock.recv(4096).decode()))
            except socket.timeout:
                pass
        assert sent == [(0.0, "WATCHDOG=1\nSTATUS=a"), (2.0, "WATCHDOG=1"),
                        (4.0, "WATCHDOG=1\nSTATUS=b")]


def test_watchdog_for_another_pid_or_no_socket_is_off():
    assert Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000",
                              "WATCHDOG_PID": "1"}, pid=4242).watchdog_interval_s is None
    quiet = Notifier.from_env({})
    assert not quiet.enabled and quiet.send("READY=1") is False


def test_send_to_a_vanished_socket_is_false_not_an_exception(tmp_path):
    n = Notifier(str(tmp_path / "gone.sock"), None)
    assert n.send("READY=1") is False


def test_from_process_env_removes_the_variables_so_workers_do_not_inherit_them():
    code = ("import os; from lab_attendant.service.sdnotify import Notifier; n = Notifier.from_env(); "
            "print(n.address, n.watchdog_interval_s, "
            "[k for k in ('NOTIFY_SOCKET','WATCHDOG_USEC','WATCHDOG_PID') if k in os.environ])")
    env = {**os.environ, "NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "30000000"}
    env.pop("WATCHDOG_PID", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["/run/x.sock", "15.0", "[]"]


def test_status_text():
    assert status_text({"queued": 3, "held": 1, "failed": 9}, running=1, stopping=False) == \
        "3 queued, 1 held, 1 running"
    assert status_text({}, running=0, stopping=True) == "stopping: 0 queued, 0 held, 0 running"
