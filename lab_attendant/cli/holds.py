"""`lab-attendant hold` and `release` (scontrol hold/release): the changes are the store's
(lab_attendant.store.deps.hold / release); this module parses and prints."""
from __future__ import annotations

import argparse

from lab_attendant.config import Config
from lab_attendant.store import deps
from lab_attendant.store.db import Store


def cmd_hold(cfg: Config, args: argparse.Namespace) -> int:
    act = deps.hold if args.cmd == "hold" else deps.release
    for line in act(Store(cfg.db_path), args.ids):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("hold", help="keep waiting runs from starting (scontrol hold)")
    h.add_argument("ids", type=int, nargs="+", metavar="ID", help="queued or held runs")
    h.set_defaults(fn=cmd_hold)
    r = sub.add_parser("release", help="let runs held by `hold` start again")
    r.add_argument("ids", type=int, nargs="+", metavar="ID", help="runs held by user")
    r.set_defaults(fn=cmd_hold)
