"""The OS seam: clocks, process spawning, process-group signals, liveness and memory readings.

The daemon and launcher call only this; unit tests pass a FakeHost (tests/unit/fakes.py).
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

import psutil


class Host:
    """The real host: subprocess, os.killpg, psutil."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def spawn(self, argv: Sequence[str], *, cwd: Path, env: dict[str, str],
              pass_fds: Sequence[int], stdout: int) -> subprocess.Popen:
        # A new session makes the worker lead its own process group: one killpg reaches
        # every grandchild it forks (unless one of them calls setsid itself).
        return subprocess.Popen(list(argv), cwd=cwd, env=env, pass_fds=tuple(pass_fds),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)

    def killpg(self, pgid: int, sig: int) -> bool:
        """Signal a process group; False when it no longer exists (ESRCH is not an error)."""
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError as exc:  # pgid reused by someone else's group: leave it alone
            if exc.errno == errno.EPERM:
                return False
            raise

    def group_alive(self, pgid: int) -> bool:
        return self.killpg(pgid, 0)

    def process_create_time(self, pid: int) -> float | None:
        try:
            return psutil.Process(pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def is_same_process(self, pid: int, create_time: float | None) -> bool:
        """True if `pid` is alive and is the process we started (not a reused pid)."""
        now = self.process_create_time(pid)
        if now is None:
            return False
        return create_time is None or abs(now - create_time) < 0.01

    def pid_alive(self, pid: int) -> bool:
        return self.process_create_time(pid) is not None

    def rss_tree_bytes(self, pid: int) -> int:
        """RSS of a process and all its descendants (0 if it is gone)."""
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total


SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}


def signal_name(signum: int) -> str:
    return SIGNAL_NAMES.get(signum, f"signal {signum}")
