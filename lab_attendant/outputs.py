"""A run's output files as `show --output` and the dashboard read them: listed and opened inside
the run's output folder only, without following a symlink at any step, regular single-link files.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def single(st: os.stat_result) -> bool:
    """A regular file with one name: a hard link planted in a run folder (to the store, another
    run's output, a file of the user's) is neither listed nor served."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def output_dir(run: Any) -> Path | None:
    return Path(run.run_dir) / "output" if run.run_dir else None


def listed(run: Any) -> list[dict[str, Any]]:
    """Files in the run's output folder (top level, regular single-link files only)."""
    folder = output_dir(run)
    if folder is None or not folder.is_dir() or folder.is_symlink():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        st = p.lstat()
        if single(st):
            out.append({"name": p.name, "size_bytes": st.st_size, "markdown": p.suffix == ".md"})
    return out


def open_output(run: Any, name: str) -> tuple[BinaryIO, int]:
    """Output `name` (a path relative to the output folder, e.g. 'verbatim/a.md'), opened one
    component at a time with O_NOFOLLOW from the folder itself, so neither a symlink nor a '..'
    leads out of it; (file, size in bytes). LookupError with what went wrong."""
    folder = output_dir(run)
    parts = PurePosixPath(name).parts
    if folder is None or not parts or PurePosixPath(name).is_absolute() or any(
            p in ("..", ".") for p in parts):
        raise LookupError(f"run {run.id} has no output {name!r}: name a file inside its output "
                          "folder (see `lab-attendant show " f"{run.id}`)")
    try:
        fd = os.open(folder, _NOFOLLOW | os.O_DIRECTORY)
    except OSError as exc:
        raise LookupError(f"run {run.id} has no output folder ({exc.strerror})") from None
    try:
        for part in parts[:-1]:
            inner = os.open(part, _NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(parts[-1], _NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as exc:
        # O_NOFOLLOW on a symlink: ELOOP (the file), ENOTDIR (a folder on the way)
        why = "a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
        raise LookupError(f"run {run.id} output {name!r} cannot be opened ({why})") from None
    finally:
        os.close(fd)
    st = os.fstat(file_fd)
    if not single(st):
        os.close(file_fd)
        raise LookupError(f"run {run.id} output {name!r} is not a plain file")
    return os.fdopen(file_fd, "rb"), st.st_size
