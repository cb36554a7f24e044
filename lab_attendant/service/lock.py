"""The state-dir lock: one daemon per state dir (flock on state_dir/daemon.lock, holder's pid inside).

`status` probes the same lock to tell whether a daemon is alive.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lab_attendant.errors import DaemonLockedError


class DaemonLock:
    """flock on state_dir/daemon.lock: one daemon per state dir; `status` probes it too."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise DaemonLockedError(f"another daemon (pid {holder}) already runs on "
                                    f"{self.path.parent}; stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def held_by_other(self) -> bool:
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
