"""Housekeeping: prune() deletes ended runs (their runs and run_events rows, guard events, run
folder and log file, together), for `lab-attendant prune` (lab_attendant.cli.prune) and the
daemon's optional `[retention]` (lab_attendant.daemon.retention).

Never pruned: a waiting or active run, nor a run a waiting run depends on (`--after`). Rows go
first, in one transaction; files follow, and run folders or logs left without a row (a crash
between the two) are swept on the next prune.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.db import Store
from lab_attendant.store.lifecycle import must_get
from lab_attendant.store.states import TERMINAL, WAITING, RunState
from lab_attendant.store.tables import GuardEvent, Run, RunEvent

KEPT_BY_KEEP_FAILED = frozenset(TERMINAL - {RunState.SUCCEEDED, RunState.CANCELLED,
                                            RunState.SKIPPED})
CHUNK = 500          # ids per DELETE ... IN (...): well under SQLite's variable limit

log = get_logger("lab_attendant.store.prune")


@dataclass(frozen=True)
class RunFolders:
    """Where runs keep files: one folder per run id, and one log per run id (ID.log)."""
    runs_dir: Path
    run_logs_dir: Path


@dataclass
class Pruned:
    runs: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)   # run folders and run logs
    bytes: int = 0

    def to_dict(self, dry_run: bool) -> dict[str, Any]:
        return {"dry_run": dry_run, "runs": self.runs, "paths": [str(p) for p in self.paths],
                "bytes": self.bytes}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _files_of(folders: RunFolders, run_ids: set[int], all_ids: set[int]) -> list[Path]:
    """The run folders and run logs of `run_ids`, and those of runs that no longer exist."""
    out = []
    for folder, pattern in ((folders.runs_dir, "*"), (folders.run_logs_dir, "*.log")):
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob(pattern)):
            stem = p.name[:-4] if p.name.endswith(".log") else p.name
            if stem.isdigit() and (int(stem) in run_ids or int(stem) not in all_ids):
                out.append(p)
    return out


def select_runs(store: Store, *, older_than_s: float | None, keep_failed: bool,
                ids: list[int] | None = None) -> list[int]:
    """Ids to prune. Named ids must all have ended (UserError otherwise, nothing pruned)."""
    with store.read() as s:
        needed = {p for r in s.scalars(select(Run).where(Run.state.in_(WAITING),
                                                         Run.after_json != "[]"))
                  for p in r.after}
        if ids:
            for rid in ids:
                run = must_get(s, rid)
                if run.state not in TERMINAL:
                    raise UserError(f"run {rid} is {run.state}; only ended runs are pruned "
                                    f"(cancel it first: `lab-attendant cancel {rid}`)")
                if rid in needed:
                    raise UserError(f"run {rid} is a dependency (--after) of a waiting run; "
                                    "prune it once that run has started or been cancelled")
            return sorted(set(ids))
        q = select(Run.id).where(Run.state.in_(TERMINAL),
                                 func.coalesce(Run.ended_at, Run.submitted_at)
                                 < time.time() - (older_than_s or 0))
        if keep_failed:
            q = q.where(Run.state.not_in(KEPT_BY_KEEP_FAILED))
        return sorted(set(s.scalars(q)) - needed)


def prune(store: Store, folders: RunFolders, *, older_than_s: float | None, keep_failed: bool,
          ids: list[int] | None = None, dry_run: bool = False) -> Pruned:
    run_ids = select_runs(store, older_than_s=older_than_s, keep_failed=keep_failed, ids=ids)
    if not dry_run:
        with store.write() as s:
            for i in range(0, len(run_ids), CHUNK):
                chunk = run_ids[i:i + CHUNK]
                # Re-checked in the deleting transaction: an ended run cannot start again.
                s.execute(delete(RunEvent).where(RunEvent.run_id.in_(chunk)))
                s.execute(delete(GuardEvent).where(GuardEvent.run_id.in_(chunk)))
                s.execute(delete(Run).where(Run.id.in_(chunk), Run.state.in_(TERMINAL)))
    with store.read() as s:
        remaining = set(s.scalars(select(Run.id)))
    out = Pruned(runs=run_ids)
    for path in _files_of(folders, set(run_ids), remaining):
        out.bytes += _size(path)
        out.paths.append(path)
        if not dry_run:
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as exc:   # logged; the next prune sweeps it as an orphan
                log.warning("could not remove a pruned run's file", path=str(path), error=str(exc))
    if run_ids and not dry_run:
        log.info("runs pruned", runs=len(run_ids), paths=len(out.paths), bytes=out.bytes)
    return out
