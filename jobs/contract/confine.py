"""Path confinement where files are opened (worker side, stdlib only): every path a job reads is
resolved, symlinks included, and must lie under one of the run spec's allowed roots.

Policy: a file param or folder param that resolves outside (e.g. a folder swapped for a symlink
after submit) fails the run; a file found *inside* a folder that resolves outside (a symlinked
note) is skipped with a `warning` event naming it. Reads re-check what was actually opened
(/proc/self/fd), so a swap between the check and the open fails the run too.
"""
from __future__ import annotations

import os
import stat
from io import FileIO
from pathlib import Path
from typing import Callable, Iterable


class OutsideRoots(PermissionError):
    """A path a job was about to read resolves outside the allowed roots."""


class Roots:
    def __init__(self, roots: Iterable[str], warn: Callable[[str], None]) -> None:
        self.roots = tuple(Path(r).resolve() for r in roots)
        self.warn = warn

    def inside(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(r) for r in self.roots)

    def _refuse(self, what: str, path: Path) -> OutsideRoots:
        return OutsideRoots(f"{what} {path} resolves to {os.path.realpath(path)}, outside the "
                            f"allowed roots ({', '.join(map(str, self.roots))}); the run reads "
                            "nothing there")

    def param(self, name: str, value: str | Path) -> Path:
        """A path param, resolved now (the worker's view, not the one at submit)."""
        path = Path(value)
        if not self.inside(path):
            raise self._refuse(f"param '{name}':", path)
        return Path(os.path.realpath(path))

    def keep(self, paths: Iterable[Path]) -> list[Path]:
        """The paths that resolve inside the roots; each one outside is skipped with a warning."""
        kept = []
        for p in paths:
            if self.inside(p):
                kept.append(p)
            else:
                self.warn(f"skipped {p}: it resolves to {os.path.realpath(p)}, outside the "
                          "allowed roots")
        return kept

    def open(self, path: Path) -> FileIO:
        """Open, then check the file actually opened (its /proc/self/fd link) and that it is a
        regular file (not a FIFO that blocks, not a device) before anything is read."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not any(real.is_relative_to(r) for r in self.roots):
                raise self._refuse("file", path)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutsideRoots(f"file {path} is not a regular file; the run reads only files")
            return os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, path: Path) -> bytes:
        with self.open(path) as fh:
            return fh.read()

    def read_text(self, path: Path, errors: str = "strict") -> str:
        return self.read_bytes(path).decode("utf-8", errors=errors)
