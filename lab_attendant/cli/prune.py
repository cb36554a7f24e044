"""`lab-attendant prune`: delete ended runs with their folders and logs (the deleting is
lab_attendant.store.prune's; this module parses and prints)."""
from __future__ import annotations

import argparse

from jobs.contract.units import format_size
from lab_attendant.cli.render import console, duration
from lab_attendant.cli.when import AGE_HELP, age_arg
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.store.db import Store
from lab_attendant.store.prune import RunFolders, prune
from lab_attendant.validate import dumps


def run_folders(cfg: Config) -> RunFolders:
    return RunFolders(runs_dir=cfg.runs_dir, run_logs_dir=cfg.paths.logs_dir / "runs")


def cmd_prune(cfg: Config, args: argparse.Namespace) -> int:
    if bool(args.ids) == (args.older_than is not None):
        raise UserError("say what to prune: either --older-than AGE (e.g. 30d) or run ids")
    out = prune(Store(cfg.db_path), run_folders(cfg), older_than_s=args.older_than,
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


def register(sub: argparse._SubParsersAction) -> None:
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
