"""`wait ID…` and `submit --wait`: follow runs until they end, with a live view on a terminal
(one line per change otherwise); say when no daemon is alive; Ctrl-C says how to re-attach.

Exit codes: 0 every run succeeded, 1 one ended otherwise, 3 --timeout passed first,
4 no daemon is running and --no-daemon exit was given, 130 Ctrl-C (the runs go on).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.live import Live
from rich.table import Table

from lab_attendant.cli.render import (
    Ellipsized,
    console,
    duration,
    progress_cell,
    progress_text,
    state_text,
)
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.service.lock import DaemonLock
from lab_attendant.store.db import Store
from lab_attendant.store.deps import waiting_for
from lab_attendant.store.figures import elapsed_s, eta_s
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.validate import dumps, printable

EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT, EXIT_NO_DAEMON, EXIT_INTERRUPTED = 0, 1, 3, 4, 130
POLL_S = 0.25
DAEMON_CHECK_S = 2.0
EXIT_CODES_HELP = ("exit 0: all succeeded; 1: one ended otherwise; 3: --timeout passed; 4: no "
                   "daemon and --no-daemon exit; 130: Ctrl-C (the runs go on)")


def daemon_alive(cfg: Config) -> bool:
    """The daemon holds the state dir's lock while it lives (as `status` reads it)."""
    return DaemonLock(cfg.paths.state_dir).held_by_other()


def _table(runs: list[Any], why: dict[int, str], now: float) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("ID", "KIND", "STATE", "PROGRESS", "ELAPSED", "ETA", "REASON"):
        if name == "REASON":
            table.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1, min_width=20)
        else:
            table.add_column(name, no_wrap=True, overflow="ellipsis")
    for r in runs:
        table.add_row(str(r.id), r.kind, state_text(r), progress_cell(r),
                      duration(elapsed_s(r, now)), duration(eta_s(r, now)),
                      Ellipsized(why.get(r.id) or r.reason))
    return table


class Follower:
    """Polls the store for `ids` until all have ended, the timeout passes or no daemon lives."""

    def __init__(self, cfg: Config, store: Store, ids: list[int], *, timeout_s: float | None,
                 no_daemon: str) -> None:
        self.cfg, self.store, self.ids = cfg, store, ids
        self.timeout_s, self.no_daemon = timeout_s, no_daemon
        self.err = console(stderr=True)
        self._daemon_seen: bool | None = None
        self._last_check = float("-inf")
        self._lines: dict[int, tuple] = {}

    def runs(self) -> list[Any]:
        return [self.store.must_get(rid) for rid in self.ids]

    def _daemon_gone(self, runs: list[Any]) -> bool:
        """Say so when the daemon is missing (once per change); True when we should stop."""
        now = time.monotonic()
        if now - self._last_check < DAEMON_CHECK_S:
            return False
        self._last_check = now
        alive = daemon_alive(self.cfg)
        if alive != self._daemon_seen:
            waiting = " ".join(str(r.id) for r in runs if r.state not in TERMINAL)
            if not alive:
                then = ("stopping (--no-daemon exit)" if self.no_daemon == "exit" else
                        "still waiting; start one with `lab-attendant daemon` (or systemctl "
                        "start lab-attendant), or pass --no-daemon exit")
                self.err.print(f"lab-attendant: no daemon is running on "
                               f"{self.cfg.paths.state_dir}; runs {waiting} wait in the queue "
                               f"until one starts; {then}")
            elif self._daemon_seen is False:
                self.err.print("lab-attendant: a daemon is running again")
            self._daemon_seen = alive
        return not alive and self.no_daemon == "exit"

    def _print_changes(self, runs: list[Any], now: float) -> None:
        for r in runs:
            key = (r.state, r.progress_done, r.progress_total)
            if self._lines.get(r.id) != key:
                self._lines[r.id] = key
                busy = r.progress_total and r.state not in TERMINAL
                self.err.print(f"run {r.id} {r.state}" + (f" {progress_text(r, now)}"
                                                          if busy else ""))

    def follow(self) -> tuple[int, list[Any]]:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        live = Live(console=self.err, auto_refresh=False, transient=False) \
            if self.err.is_terminal else None
        try:
            if live:
                live.start()
            while True:
                runs, now = self.runs(), time.time()
                if live:
                    live.update(_table(runs, waiting_for(self.store, runs), now), refresh=True)
                else:
                    self._print_changes(runs, now)
                if all(r.state in TERMINAL for r in runs):
                    ok = all(r.state is RunState.SUCCEEDED for r in runs)
                    return (EXIT_OK if ok else EXIT_FAILED), runs
                if deadline is not None and time.monotonic() >= deadline:
                    return EXIT_TIMEOUT, runs
                if self._daemon_gone(runs):
                    return EXIT_NO_DAEMON, runs
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            ids = " ".join(map(str, self.ids))
            self.err.print(f"\nstopped waiting; the runs go on. Re-attach with: "
                           f"lab-attendant wait {ids}")
            return EXIT_INTERRUPTED, self.runs()
        finally:
            if live:
                live.stop()


def report(code: int, runs: list[Any], as_json: bool, single: bool = False) -> None:
    if as_json:
        print(dumps(runs[0].to_dict() if single else
                    {"exit_code": code, "runs": [r.to_dict() for r in runs]}))
        return
    for r in runs:
        print(f"run {r.id} {r.state}: {printable(r.reason)}")
    if code == EXIT_TIMEOUT:
        print("timed out waiting; the runs go on", file=sys.stderr)


def cmd_wait(cfg: Config, args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.timeout >= 0:     # NaN too
        raise UserError(f"--timeout must be 0 or more seconds, got {args.timeout}")
    store = Store(cfg.db_path)
    for rid in args.ids:
        store.must_get(rid)            # every id exists before we wait on any
    code, runs = Follower(cfg, store, args.ids, timeout_s=args.timeout,
                          no_daemon=args.no_daemon).follow()
    if code != EXIT_INTERRUPTED:
        report(code, runs, args.json)
    return code


def add_no_daemon(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-daemon", choices=("wait", "exit"), default="wait",
                   help="when no daemon is running: say so and keep waiting (default), or "
                   "exit with code 4")


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("wait", help="wait until runs end; the exit code says how they ended",
                       description=EXIT_CODES_HELP)
    w.add_argument("ids", type=int, nargs="+", metavar="ID", help="runs to wait for")
    w.add_argument("--timeout", type=float, metavar="S",
                   help="give up after S seconds (exit 3); the runs go on")
    add_no_daemon(w)
    w.add_argument("--json", action="store_true",
                   help="machine-readable: {exit_code, runs} at the end")
    w.set_defaults(fn=cmd_wait)
