"""Run notifications ([notify]): a configured argv command with the run in LAB_ATTENDANT_*
environment variables, or an HTTP POST to an ntfy-style URL, for the ends in [notify] `on` and
those a run asked for (`submit --notify end|fail|all`). Each one runs in its own thread with
a timeout, so a hung command or a dead URL never blocks the daemon's loop.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from lab_attendant.config import NotifyConfig
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.validate import printable

log = get_logger("lab_attendant.daemon.notify")

# `submit --notify` (Slurm's --mail-type): the ends that notify for this run besides [notify] on;
# "all" also notifies when its worker starts (LAB_ATTENDANT_RUN_STATE=started).
FAIL_ENDS = frozenset(s.value for s in TERMINAL - {RunState.SUCCEEDED, RunState.CANCELLED,
                                                   RunState.SKIPPED})
PER_RUN_ENDS = {"end": frozenset(s.value for s in TERMINAL), "fail": FAIL_ENDS,
                "all": frozenset(s.value for s in TERMINAL)}
NOTIFY_CHOICES = tuple(PER_RUN_ENDS)
STARTED = "started"


def run_env(info: dict[str, Any]) -> dict[str, str]:
    """The run as environment variables: LAB_ATTENDANT_RUN_ID, _KIND, _STATE, _REASON, ..."""
    return {f"LAB_ATTENDANT_{k.upper()}": "" if v is None else str(v) for k, v in info.items()}


def message(info: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of a notification."""
    label = f"run {info['run_id']}" + (f" '{info['run_name']}'" if info.get("run_name") else "")
    title = f"lab-attendant: {label} ({info['run_kind']}) {info['run_state']}"
    return title, f"{title} on {info['host']}: {info['run_reason']}"


class Notifications:
    def __init__(self, cfg: NotifyConfig, host) -> None:
        self.cfg = cfg
        self.host = host
        self.threads: list[threading.Thread] = []

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.command or self.cfg.url)

    def run_ended(self, info: dict[str, Any], notify: str | None = None) -> threading.Thread | None:
        """Send one notification for a run that ended in a state of `on`, or of the run's own
        `--notify`; returns its thread."""
        if info["run_state"] not in set(self.cfg.on) | PER_RUN_ENDS.get(notify or "", frozenset()):
            return None
        return self._send(info)

    def run_started(self, info: dict[str, Any], notify: str | None) -> threading.Thread | None:
        """`--notify all`: one notification when the run's worker starts."""
        if notify != "all":
            return None
        return self._send({**info, "run_state": STARTED})

    def _send(self, info: dict[str, Any]) -> threading.Thread | None:
        if not self.enabled:
            return None
        info = {k: printable(v, one_line=True) if isinstance(v, str) else v
                for k, v in {**info, "host": socket.gethostname()}.items()}
        target = self._command if self.cfg.command else self._post
        t = threading.Thread(target=self._guarded, args=(target, info),
                             name=f"notify-run-{info['run_id']}", daemon=True)
        self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()
        return t

    def join(self) -> None:
        """At daemon exit: let notifications in flight finish (each is bounded by timeout_s)."""
        deadline = time.monotonic() + self.cfg.timeout_s + 5   # one wait for all, not one each
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _guarded(self, target, info: dict[str, Any]) -> None:
        try:
            target(info)
        except Exception as exc:  # noqa: BLE001 - a notification must never take the daemon down
            log.error("notification failed", run_id=info["run_id"],
                      error=f"{type(exc).__name__}: {exc}")

    def _command(self, info: dict[str, Any]) -> None:
        argv = self.cfg.command
        proc, out = self.host.start_command(argv, env={**os.environ, **run_env(info)})
        try:
            code = proc.wait(timeout=self.cfg.timeout_s)
        except subprocess.TimeoutExpired:
            self.host.killpg(proc.pid, signal.SIGKILL)   # its own session: the whole group
            proc.wait()
            log.error("notify command timed out and was killed", run_id=info["run_id"],
                      command=list(argv), timeout_s=self.cfg.timeout_s)
            return
        finally:
            out.seek(0)
            output = out.read().decode("utf-8", "replace")[-500:]
            out.close()
        if code != 0:
            log.error("notify command failed", run_id=info["run_id"], command=list(argv),
                      exit_code=code, output=output)
        else:
            log.info("notification sent", run_id=info["run_id"], via="command")

    def _post(self, info: dict[str, Any]) -> None:
        title, body = message(info)
        req = urllib.request.Request(self.cfg.url, data=body.encode(), method="POST", headers={
            "Title": title.encode("latin-1", "replace").decode("latin-1"), "Priority": "high", "Tags": "warning",
            "Content-Type": "text/plain; charset=utf-8"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                status = resp.status
        except (OSError, urllib.error.URLError) as exc:   # timeouts are OSErrors
            log.error("notify POST failed", run_id=info["run_id"], url=self.cfg.url,
                      error=f"{type(exc).__name__}: {exc}", timeout_s=self.cfg.timeout_s)
            return
        log.info("notification sent", run_id=info["run_id"], via="url", status=status)
