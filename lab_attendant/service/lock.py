"""The state-dir lock: one daemon per state dir (flock on state_dir/daemon.lock, 0600, holder's
pid inside). `status` probes the same lock to tell whether a daemon is alive.

Another local user cannot open the 0600 file to hold it; one who opened it while it was still
0644 is named (pid and user, from /proc/locks) instead of being mistaken for a daemon.
"""
from __future__ import annotations

import fcntl
import os
import pwd
import time
from dataclasses import dataclass
from pathlib import Path

from lab_attendant.errors import DaemonLockedError
from lab_attendant.service.private import make_private

LOCK_MODE = 0o600
# A probe (`status`, `wait`) holds the lock for a moment, and a restarted daemon's predecessor
# may still be exiting: retry that long before saying another daemon runs.
ACQUIRE_RETRY_S = 2.0
_RETRY_STEP_S = 0.05


@dataclass(frozen=True)
class LockHolder:
    pid: int | None        # from /proc/locks; None where the kernel does not say
    uid: int | None        # the holder's real uid; None when unknown

    @property
    def foreign(self) -> bool:
        """Held by another user: not a daemon of this state dir, which runs as its owner."""
        return self.uid is not None and self.uid != os.geteuid()

    def describe(self) -> str:
        return f"pid {self.pid if self.pid is not None else '?'} of user {_user_name(self.uid)}"


def _user_name(uid: int | None) -> str:
    if uid is None:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _holder_of(fd: int) -> LockHolder:
    """Who holds a flock on the file behind `fd`: /proc/locks lists 'FLOCK ... pid maj:min:inode'."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return LockHolder(None, None)
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and key in fields:
            pid = int(fields[fields.index(key) - 1])
            try:
                uid = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                uid = None
            return LockHolder(pid, uid)
    return LockHolder(None, None)


class DaemonLock:
    """flock on state_dir/daemon.lock: one daemon per state dir; `status` probes it too."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "daemon.lock"
        self._fd: int | None = None

    def _open(self, flags: int) -> int:
        fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_MODE)
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(fd, LOCK_MODE)    # a lock file a 022 umask left readable to others
        return fd

    def acquire(self) -> None:
        make_private(self.state_dir)
        fd = self._open(os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + ACQUIRE_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(_RETRY_STEP_S)
                    continue
                holder = _holder_of(fd)
                pid_inside = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if holder.foreign:
                    raise DaemonLockedError(
                        f"{self.path} is locked by {holder.describe()}, which is not a daemon of "
                        f"this user: stop that process and start again (the file is now "
                        f"{LOCK_MODE:o}, so others cannot open it again)") from None
                raise DaemonLockedError(f"another daemon (pid {pid_inside}) already runs on "
                                        f"{self.state_dir}; stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def holder(self) -> LockHolder | None:
        """Who holds the lock now, or None. Probed with an exclusive lock: a shared lock taken
        by someone else would let a shared probe through while the daemon cannot start."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _holder_of(fd)
        finally:
            os.close(fd)

    def held_by_other(self) -> bool:
        """A daemon of this user holds the lock (a lock held by another user is no daemon)."""
        holder = self.holder()
        return holder is not None and not holder.foreign

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
