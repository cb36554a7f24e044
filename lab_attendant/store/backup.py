"""Store safety copies: `db check` (integrity), `db backup PATH` (SQLite's online backup API),
`db restore [BACKUP]`, and the daemon's rotating automatic backup ([paths] backups, keep N).

Everything here opens the file with the plain sqlite3 module, so a damaged store can be examined.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import get_logger

log = get_logger("lab_attendant.store.backup")
PREFIX, SUFFIX = "lab_attendant-", ".sqlite3"


def check(db_path: Path) -> list[str]:
    """`PRAGMA integrity_check` on the file, read-only: [] when it is sound, else the problems."""
    if not db_path.is_file():
        raise UserError(f"no store at {db_path}; it is created by the first submit or daemon start")
    try:
        with sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True, timeout=60) as conn:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def backup(db_path: Path, dest: Path) -> Path:
    """A consistent copy of the live store (other processes may keep writing), written to a
    temporary name, fsynced and renamed, so `dest` is never a half copy."""
    if not db_path.is_file():
        raise UserError(f"no store at {db_path} to back up")
    if dest.is_dir():
        dest = dest / f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}{SUFFIX}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        with sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True, timeout=60) as src, \
                sqlite3.connect(tmp) as dst:
            src.backup(dst)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def newest(backups_dir: Path) -> Path | None:
    found = sorted(backups_dir.glob(f"{PREFIX}*{SUFFIX}")) if backups_dir.is_dir() else []
    return found[-1] if found else None


def restore(db_path: Path, source: Path) -> Path:
    """Put `source` in the store's place; the current file (and its -wal/-shm) is kept beside it
    as NAME.corrupt-TIME. The caller makes sure no daemon runs."""
    problems = check(source)
    if problems:
        raise UserError(f"backup {source} is damaged too ({problems[0]}); pick another with "
                        "`lab-attendant db restore PATH`")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = db_path.with_name(f"{db_path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{db_path}{suffix}")
        if old.exists():
            os.replace(old, Path(f"{kept}{suffix}"))
    backup(source, db_path)
    return kept


def prune(backups_dir: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest automatic backups (names sort by time)."""
    found = sorted(backups_dir.glob(f"{PREFIX}*{SUFFIX}"))
    gone = found[:-keep] if keep > 0 else found
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class AutoBackup:
    """The daemon's rotating backup: one every interval_s (the first soon after start when the
    newest is older than that), keeping the `keep` newest. A failed backup is logged, never fatal."""

    def __init__(self, db_path: Path, backups_dir: Path, *, keep: int, interval_s: float) -> None:
        self.db_path, self.dir, self.keep, self.interval_s = db_path, backups_dir, keep, interval_s
        last = newest(backups_dir)
        self.last_wall = last.stat().st_mtime if last else 0.0

    def tick(self, now_wall: float) -> Path | None:
        if now_wall - self.last_wall < self.interval_s:
            return None
        self.last_wall = now_wall   # a failure waits a whole interval too, not every tick
        try:
            path = backup(self.db_path, self.dir / f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.localtime(now_wall))}{SUFFIX}")
            removed = prune(self.dir, self.keep)
        except (OSError, sqlite3.Error, UserError) as exc:
            log.warning("automatic store backup failed", dir=str(self.dir), error=str(exc))
            return None
        log.info("store backed up", path=str(path), removed=[p.name for p in removed])
        return path
