"""Housekeeping: `prune` deletes ended runs (their runs and run_events rows, guard events, run
folder and log file, together) and the daemon's optional `[retention]` does the same once a day.

Never pruned: a waiting or active run, nor a run a waiting run depends on (`--after`). Rows go
first, in one transaction; files follow, and run folders or logs left without a row (a crash
between the two) are swept on the next prune.
"""
from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from jobs.contract.units import format_size
from lab_attendant.cli.render import console, duration
from lab_attendant.cli.when import AGE_HELP, age_arg
from lab_attendant.config import Config, RetentionConfig
from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.db import GuardEvent, Run, RunEvent, Store, must_get
from lab_attendant.store.states import TERMINAL, WAITING, RunState
from lab_attendant.validate import dumps

KEPT_BY_KEEP_FAILED = frozenset(TERMINAL - {RunState.SUCCEEDED, RunState.CANCELLED,
                                            RunState.SKIPPED})
CHUNK = 500          # ids per DELETE ... IN (...): well under SQLite's variable limit

log = get_logger("lab_attendant.store.prune")


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


def _files_of(cfg: Config, run_ids: set[int], all_ids: set[int]) -> list[Path]:
    """The run folders and run logs of `run_ids`, and those of runs that no longer exist."""
    out = []
    for folder, pattern in ((cfg.runs_dir, "*"), (cfg.paths.logs_dir / "runs", "*.log")):
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


def prune(cfg: Config, store: Store, *, older_than_s: float | None, keep_failed: bool,
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
    for path in _files_of(cfg, set(run_ids), remaining):
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


class Retention:
    """The daemon's `[retention]`: prune once every interval_s (the first soon after start)."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg, self.store, self.rc = cfg, store, cfg.retention
        self.last_wall: float | None = None

    def tick(self, now_wall: float) -> Pruned | None:
        rc: RetentionConfig = self.rc
        if not rc.older_than_days or (self.last_wall is not None
                                      and now_wall - self.last_wall < rc.interval_s):
            return None
        self.last_wall = now_wall
        return prune(self.cfg, self.store, older_than_s=rc.older_than_days * 86400,
                     keep_failed=rc.keep_failed)


def cmd_prune(cfg: Config, args: argparse.Namespace) -> int:
    if bool(args.ids) == (args.older_than is not None):
        raise UserError("say what to prune: either --older-than AGE (e.g. 30d) or run ids")
    out = prune(cfg, Store(cfg.db_path), older_than_s=args.older_than,
                keep_failed=args.keep_failed, ids=args.ids, dry_run=args.dry_run)
    if args.json:
        print(dumps(out.to_dict(args.dry_run)))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    what = (f"older than {duration(args.older_than)}" if args.older_than is not None else "named")
    shown = ", ".join(map(str, out.runs[:20])) + (" …" if len(out.runs) > 20 else "")
    console().print(f"{verb} {len(out.runs)} ended runs {what}" + (f" ({shown})" if shown else "")
                    + f" and {len(out.paths)} run folders and logs ({format_size(out.bytes)})")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("prune", help="delete ended runs: rows, run folders and logs together "
                       "(never a waiting or running run)")
    p.add_argument("ids", type=int, nargs="*", metavar="ID",
                   help="these ended runs (instead of --older-than)")
    p.add_argument("--older-than", type=age_arg, metavar="AGE",
                   help=f"runs that ended more than AGE ago ({AGE_HELP})")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep runs that failed (failed, oom, timed_out, killed_thermal, lost); "
                   "prune only succeeded, cancelled and skipped ones")
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable: ids, paths, bytes")
    p.set_defaults(fn=cmd_prune)
