"""sd_notify for Type=notify units: READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 on $NOTIFY_SOCKET.

Its own small OS seam (one AF_UNIX datagram socket); a no-op when systemd did not start us.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Mapping

# Read once, then removed from os.environ so worker subprocesses never talk to systemd as us.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_EVERY_S = 2.0


class Notifier:
    def __init__(self, address: str | None, watchdog_interval_s: float | None) -> None:
        # '@name' is Linux's abstract namespace: a leading NUL byte on the wire.
        self.address = ("\0" + address[1:]) if address and address.startswith("@") else address
        self.watchdog_interval_s = watchdog_interval_s   # send WATCHDOG=1 this often; None = off
        self._sock: socket.socket | None = None
        self._last_watchdog = float("-inf")
        self._last_status_check = float("-inf")
        self._last_status = ""
        self._stopping_sent = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 pid: int | None = None) -> "Notifier":
        """Build from systemd's environment; ping the watchdog at half of WATCHDOG_USEC (what
        sd_watchdog_enabled() advises) unless WATCHDOG_PID names another process."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        interval_s = None
        usec, wd_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(pid or os.getpid())):
            interval_s = int(usec) / 1e6 / 2
        if environ is None:
            for key in NOTIFY_ENV:
                os.environ.pop(key, None)
        return cls(address, interval_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE lines as one datagram; False (never an exception) if it did not go:
        a daemon must not die because systemd went away."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))
        self._last_status = status

    def tick(self, now_s: float, status: Callable[[], str]) -> None:
        """Called from every loop iteration: a hung loop stops the WATCHDOG=1 pings and systemd
        restarts the service. STATUS= is recomputed every STATUS_EVERY_S, sent when it changed."""
        if not self.address:
            return
        fields = []
        if self.watchdog_interval_s is not None and \
                now_s - self._last_watchdog >= self.watchdog_interval_s:
            fields.append("WATCHDOG=1")
            self._last_watchdog = now_s
        if now_s - self._last_status_check >= STATUS_EVERY_S:
            self._last_status_check = now_s
            text = status()
            if text != self._last_status:
                fields.append(f"STATUS={text}")
                self._last_status = text
        if fields:
            self.send(*fields)

    def stopping(self, status: str = "") -> None:
        """Once: at the start of a warm shutdown, or when the loop ends for another reason."""
        if not self._stopping_sent:
            self._stopping_sent = self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_text(counts: Mapping[Any, int], *, running: int, stopping: bool) -> str:   # keyed by RunState (a str)
    """What `systemctl status` shows on its Status: line."""
    text = f"{counts.get('queued', 0)} queued, {counts.get('held', 0)} held, {running} running"
    return ("stopping: " + text) if stopping else text
