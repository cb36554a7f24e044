"""`lab-attendant watch`: a live view (rich Live) of the daemon, the guard readings, the running
runs with progress, ETA and tokens/s, the queue and the last ended runs; Ctrl-C leaves it.

In a pipe or a file there is no cursor to move: one plain frame is printed per interval, and
flushed, so `timeout 60 lab-attendant watch > morning.txt` keeps every frame.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from jobs.contract.units import format_size
from lab_attendant.cli import columns
from lab_attendant.cli.render import ago, console, local_time
from lab_attendant.cli.wait import daemon_alive
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.store.db import Store
from lab_attendant.store.deps import waiting_for
from lab_attendant.store.states import ACTIVE, TERMINAL, WAITING
from lab_attendant.store.tables import GUARD_READINGS

RECENT = 5


def _header(cfg: Config, store: Store, now: float) -> Text:
    alive = daemon_alive(cfg)
    row = store.latest_daemon()
    counts = store.count_by_state()
    text = Text(f"lab-attendant  {local_time(now)}  ", style="bold")
    if alive and row:
        text.append(f"daemon pid {row.pid}, paging {'on' if row.experimental_paging else 'off'}",
                    style="green")
    else:
        text.append("no daemon running (runs wait in the queue)", style="red")
    text.append("  ·  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=str)
                                    if s in WAITING or s in ACTIVE) or "  ·  idle")
    g = store.get_meta(GUARD_READINGS) if alive else None
    if g:
        text.append(f"\nguards ({ago(g.get('at'), now)}): ")
        parts = [f"GPU {gpu['index']} {gpu.get('temperature_c')} °C "
                 f"{format_size(gpu.get('memory_used_bytes') or 0)}/"
                 f"{format_size(gpu.get('memory_total_bytes') or 0)}"
                 for gpu in g.get("gpus") or []]
        if g.get("gpu_unavailable"):
            parts.append(f"GPU readings unavailable: {g['gpu_unavailable']}")
        if g.get("available_ram_bytes") is not None:
            parts.append(f"host RAM free {format_size(g['available_ram_bytes'])}")
        if g.get("paging_hold"):
            parts.append(f"paging held: {g['paging_hold']}")
        text.append("; ".join(parts) or "no readings")
    return text


def _running(out: Console, runs: list[Any], workers: dict[str, Any], now: float) -> Table:
    rows = [columns.Row(r, now, worker=workers.get(str(r.id)) or {}) for r in runs]
    table = columns.table(out, columns.WATCH_RUNNING, rows)
    table.title, table.title_justify = "running", "left"
    return table


def frame(cfg: Config, store: Store, out: Console, live: bool = True) -> Group:
    now = time.time()
    active = store.list_runs(states=ACTIVE, oldest_first=True)
    waiting = store.list_runs(states=WAITING, oldest_first=True)
    ended = store.list_runs(states=TERMINAL, limit=RECENT)
    guards = store.get_meta(GUARD_READINGS) or {}
    parts: list[Any] = [_header(cfg, store, now), Text("")]
    parts.append(_running(out, active, guards.get("workers") or {}, now) if active
                 else Text("nothing running", style="dim"))
    if waiting:
        queue = columns.runs_table(out, waiting, waiting_for(store, waiting), now)
        queue.title, queue.title_justify = f"queue ({len(waiting)})", "left"
        parts += [Text(""), queue]
    if ended:
        recent = columns.runs_table(out, ended, now=now)
        recent.title, recent.title_justify = "recently ended", "left"
        parts += [Text(""), recent]
    if live:
        parts.append(Text("\nCtrl-C to leave", style="dim"))
    return Group(*parts)


def cmd_watch(cfg: Config, args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise UserError(f"--interval must be a positive number of seconds, got {args.interval}")
    store = Store(cfg.db_path)
    out = console()
    if args.once or not out.is_terminal:
        # A pipe or a file: plain frames, each flushed whole, one per interval.
        while True:
            out.print(frame(cfg, store, out, live=False))
            out.print()
            out.file.flush()
            if args.once:
                return 0
            time.sleep(args.interval)
    try:
        with Live(frame(cfg, store, out), console=out, auto_refresh=False,
                  screen=args.screen) as live:
            while True:
                time.sleep(args.interval)
                live.update(frame(cfg, store, out), refresh=True)
    except KeyboardInterrupt:
        out.print("stopped watching; the daemon and its runs go on")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("watch", help="live view: running runs with progress, ETA and tokens/s, "
                       "the queue and the guard readings (Ctrl-C leaves)")
    w.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    w.add_argument("--once", action="store_true", help="print one frame and exit")
    w.add_argument("--screen", action="store_true",
                   help="use the whole terminal (alternate screen), like top")
    w.set_defaults(fn=cmd_watch)
