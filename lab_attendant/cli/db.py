"""`lab-attendant db check | backup PATH | restore [BACKUP]`: the store's health and safety copies
(the work is in backup.py; this is the verb and its arguments)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.service.lock import DaemonLock
from lab_attendant.store import backup
from lab_attendant.store.faults import recovery_hint


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="check, back up or restore the SQLite store")
    dsub = db.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("check", help="integrity check of the store (read-only; exit 1 if damaged)")
    b = dsub.add_parser("backup", help="a consistent copy of the live store (SQLite online "
                        "backup; safe while the daemon runs)")
    b.add_argument("path", help="file to write, or a folder (existing, or written DIR/) to put "
                   "a time-stamped copy in")
    r = dsub.add_parser("restore", help="put a backup in the store's place (daemon stopped); "
                        "the current file is kept beside it")
    r.add_argument("path", nargs="?", help="backup file (default: the newest in [paths] backups)")
    db.set_defaults(fn=cmd_db)


def cmd_db(cfg: Config, args: argparse.Namespace) -> int:
    db_path = cfg.db_path
    if args.db_cmd == "check":
        problems = backup.check(db_path)
        if not problems:
            print(f"store {db_path}: ok")
            return 0
        print(f"store {db_path} is damaged: {'; '.join(problems[:5])}")
        print(recovery_hint(db_path))
        return 1
    if args.db_cmd == "backup":
        dest = Path(args.path).expanduser().resolve()
        if args.path.endswith(os.sep):    # "DIR/": a time-stamped file in it
            dest.mkdir(parents=True, exist_ok=True)
        dest = backup.backup(db_path, dest)
        print(f"backed up {db_path} to {dest}")
        return 0
    if DaemonLock(cfg.paths.state_dir).held_by_other():
        raise UserError("a daemon is running on this state dir; stop it first "
                        "(systemctl stop lab-attendant, or Ctrl-C), then restore")
    source = Path(args.path).expanduser().resolve() if args.path else backup.newest(cfg.backups_dir)
    if source is None or not source.is_file():
        raise UserError(f"no backup {'at ' + str(source) if args.path else 'in ' + str(cfg.backups_dir)}"
                        "; name one with `lab-attendant db restore PATH`")
    kept = backup.restore(db_path, source)
    print(f"restored {db_path} from {source}; the previous file is kept as {kept}")
    return 0
