"""`lab-attendant stats`: history per kind as a table or JSON (the figures are
lab_attendant.store.history's)."""
from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from lab_attendant.cli.render import console, duration, local_time, number_text
from lab_attendant.cli.when import AGE_HELP, age_arg
from lab_attendant.config import Config
from lab_attendant.store.db import Store
from lab_attendant.store.history import stats
from lab_attendant.validate import dumps


def _trend(series: list[dict[str, Any]]) -> str:
    if not series:
        return "-"
    first, last = series[0]["tokens_per_s"], series[-1]["tokens_per_s"]
    if len(series) == 1:
        return f"{number_text(first)} ({series[0]['day']})"
    change = f" ({(last - first) / first:+.0%})" if first else ""
    return f"{number_text(first)} → {number_text(last)}{change} over {len(series)} days"


def stats_table(st: dict[str, Any]) -> Table:
    window = (f"since {local_time(st['from'])}" if st["from"] else "all time")
    table = Table(title=f"runs {window}" + (f", kind {st['kind']}" if st["kind"] else ""),
                  title_justify="left", box=None, header_style="bold", pad_edge=False)
    for name in ("KIND", "RUNS", "OK", "FAILED", "SUCCESS", "MEAN", "P95", "TOK/S", "TOK/S TREND",
                 "BY STATE"):
        table.add_column(name, justify="left" if name in ("KIND", "TOK/S TREND", "BY STATE")
                         else "right", no_wrap=name != "BY STATE")
    rows = [*st["kinds"].items()] + ([("all", st["total"])] if len(st["kinds"]) > 1 else [])
    for kind, s in rows:
        rate = "-" if s["success_rate"] is None else f"{s['success_rate']:.0%}"
        table.add_row(kind, str(s["runs"]), str(s["succeeded"]), str(s["failed"]), rate,
                      duration(s["mean_duration_s"]), duration(s["p95_duration_s"]),
                      "-" if s["tokens_per_s"] is None else number_text(s["tokens_per_s"]),
                      _trend(s["tokens_per_s_by_day"]),
                      ", ".join(f"{n} {state}" for state, n in s["by_state"].items()))
    return table


def cmd_stats(cfg: Config, args: argparse.Namespace) -> int:
    st = stats(Store(cfg.db_path), since_s=args.since, kind=args.kind)
    if args.json:
        print(dumps(st))
    elif not st["total"]["runs"]:
        print("no runs in that window")
    else:
        console().print(stats_table(st))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("stats", help="history per kind: counts by state, success rate, mean and "
                        "p95 duration, tokens/s trend (sacct)")
    st.add_argument("--since", type=age_arg, metavar="AGE",
                    help=f"runs submitted in the last AGE ({AGE_HELP}; default: all)")
    st.add_argument("--kind", help="only this kind")
    st.add_argument("--json", action="store_true", help="machine-readable: the figures as JSON")
    st.set_defaults(fn=cmd_stats)
