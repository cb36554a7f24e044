"""Private files: every lab-attendant process runs under umask 077, and the state, log and backup
folders it owns are 0700, so another local user reads no run names, params, outputs or logs.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700


def private_umask() -> None:
    """New files 0600, new folders 0700, in this process and every worker it starts."""
    os.umask(PRIVATE_UMASK)


def make_private(folder: Path) -> None:
    """Create `folder` 0700, or take group/other bits off one we own that a 022 umask made.
    A folder someone else owns (a shared mount, /var/log) is left alone: we cannot chmod it."""
    folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, stat.S_IMODE(st.st_mode) & 0o700)


def private_process(*folders: Path | None) -> None:
    """What every verb does first: umask 077; the folders it will write, if they exist, 0700
    (existing ones only: a read-only verb such as `list` creates nothing)."""
    private_umask()
    for folder in folders:
        if folder is not None and folder.is_dir():
            make_private(folder)
