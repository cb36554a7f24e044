"""`lab-attendant cancel`, `hold` and `release` (scancel, scontrol hold/release): by id, or in bulk by
--state/--name/--kind with --dry-run; the changes are the store's, this module selects and prints."""
from __future__ import annotations

import argparse
from typing import Callable

from lab_attendant.cli.runs import parse_states
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.store import deps
from lab_attendant.store.db import Store
from lab_attendant.store.queue import is_cancellable, is_holdable, is_releasable, select_runs
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.store.tables import Run

_ACTS_ON: dict[str, Callable[[Run], bool]] = {
    "cancel": is_cancellable, "hold": is_holdable, "release": is_releasable}


def _selected(store: Store, args: argparse.Namespace) -> list[Run]:
    states = parse_states(args.state)
    if not (args.ids or states or args.name or args.kind):
        raise UserError(f"name the runs to {args.cmd}: their ids, or a selection with --state, "
                        f"--name or --kind (add --dry-run to see it first)")
    return select_runs(store, ids=args.ids, states=states, name=args.name, kind=args.kind,
                       acts_on=_ACTS_ON[args.cmd])


def _describe(run: Run) -> str:
    name = f" '{run.name}'" if run.name else ""
    return f"run {run.id} ({run.kind}{name}, {run.state})"


def cmd_bulk(cfg: Config, args: argparse.Namespace) -> int:
    store = Store(cfg.db_path)
    runs = _selected(store, args)
    if not runs:
        print(f"no runs to {args.cmd} match")
        return 0
    if args.dry_run:
        for run in runs:
            print(f"would {args.cmd} {_describe(run)}")
        print(f"{len(runs)} run{'s' if len(runs) != 1 else ''}; nothing changed (--dry-run)")
        return 0
    if args.cmd == "cancel":
        _cancel(cfg, store, runs)
        return 0
    act = deps.hold if args.cmd == "hold" else deps.release
    for line in act(store, [r.id for r in runs]):
        print(line)
    return 0


def _cancel(cfg: Config, store: Store, runs: list[Run]) -> None:
    for old in runs:
        run = store.request_cancel(old.id)
        assert run is not None   # every run was read from the store above; cancel never deletes
        if run.state is RunState.CANCELLED:
            print(f"run {run.id} cancelled")
        elif run.state in TERMINAL:
            print(f"run {run.id} already ended ({run.state}); nothing to cancel")
        else:
            print(f"run {run.id} is {run.state}; the daemon will stop it (SIGTERM, then SIGKILL "
                  f"after {cfg.limits.kill_grace_s:g} s)")


def _selection(p: argparse.ArgumentParser, which: str) -> None:
    p.add_argument("ids", type=int, nargs="*", metavar="ID", help=which)
    p.add_argument("--state", metavar="S[,S]", help="only runs in these states")
    p.add_argument("--name", metavar="GLOB", help="only runs whose name matches ('nightly-*')")
    p.add_argument("--kind", help="only runs of this kind")
    p.add_argument("--dry-run", action="store_true", help="list the runs it would change, "
                   "change nothing")
    p.set_defaults(fn=cmd_bulk)


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cancel", help="cancel runs (waiting ones at once; running ones SIGTERM, "
                       "then SIGKILL after grace), by id or by --state/--name/--kind (scancel)")
    _selection(c, "runs to cancel (with a filter: only these among the runs it selects)")
    h = sub.add_parser("hold", help="keep waiting runs from starting (scontrol hold), by id or "
                       "by --state/--name/--kind")
    _selection(h, "queued or held runs")
    r = sub.add_parser("release", help="let runs held by `hold` start again, by id or by "
                       "--state/--name/--kind")
    _selection(r, "runs held by user")
