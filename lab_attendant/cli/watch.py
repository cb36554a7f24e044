"""`lab-attendant watch`: a live view (rich Live) of the daemon, the guard readings, the running
runs with progress, ETA and tokens/s, the queue and the last ended runs; Ctrl-C leaves it.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from jobs.contract.units import format_size
from lab_attendant.cli.render import (
    ago,
    console,
    duration,
    local_time,
    number_text,
    progress_cell,
    runs_table,
    state_text,
)
from lab_attendant.cli.wait import daemon_alive
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.store.db import Store
from lab_attendant.store.deps import waiting_for
from lab_attendant.store.figures import elapsed_s, eta_s, tokens_per_s
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


def _running(runs: list[Any], workers: dict[str, Any], now: float) -> Table:
    table = Table(title="running", title_justify="left", box=None, header_style="bold",
                  pad_edge=False)
    for name in ("ID", "NAME", "KIND", "STATE", "PROGRESS", "DONE", "ELAPSED", "ETA", "TOK/S",
                 "RSS"):
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    for r in runs:
        w = workers.get(str(r.id)) or {}
        tps = tokens_per_s(r)
        table.add_row(str(r.id), r.name or "", r.kind, state_text(r), progress_cell(r, 20),
                      f"{r.progress_done}/{r.progress_total} {r.progress_unit or ''}"
                      if r.progress_total else "-",
                      duration(elapsed_s(r, now)), duration(eta_s(r, now)),
                      number_text(tps) if tps is not None else "-",
                      format_size(w["rss_bytes"]) if w.get("rss_bytes") else "-")
    return table


def frame(cfg: Config, store: Store) -> Group:
    now = time.time()
    active = store.list_runs(states=ACTIVE, oldest_first=True)
    waiting = store.list_runs(states=WAITING, oldest_first=True)
    ended = store.list_runs(states=TERMINAL, limit=RECENT)
    guards = store.get_meta(GUARD_READINGS) or {}
    parts: list[Any] = [_header(cfg, store, now), Text("")]
    parts.append(_running(active, guards.get("workers") or {}, now) if active
                 else Text("nothing running", style="dim"))
    if waiting:
        queue = runs_table(waiting, waiting_for(store, waiting), now)
        queue.title, queue.title_justify = f"queue ({len(waiting)})", "left"
        parts += [Text(""), queue]
    if ended:
        recent = runs_table(ended, now=now)
        recent.title, recent.title_justify = "recently ended", "left"
        parts += [Text(""), recent]
    parts.append(Text("\nCtrl-C to leave", style="dim"))
    return Group(*parts)


def cmd_watch(cfg: Config, args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise UserError(f"--interval must be a positive number of seconds, got {args.interval}")
    store = Store(cfg.db_path)
    out = console()
    if args.once:
        out.print(frame(cfg, store))
        return 0
    try:
        with Live(frame(cfg, store), console=out, auto_refresh=False,
                  screen=args.screen) as live:
            while True:
                time.sleep(args.interval)
                live.update(frame(cfg, store), refresh=True)
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
