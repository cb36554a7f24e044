"""The reading verbs for runs: `list` (filters, table), `show` (one run in words), `logs [-f]`
(with progress lines while it follows) and `kinds [--json]`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.markdown import Markdown
from rich.text import Text

from jobs.contract.kinds import registry
from lab_attendant import outputs as run_outputs
from lab_attendant.cli import columns
from lab_attendant.cli.render import console, output_files, progress_text, run_details
from lab_attendant.cli.when import AGE_HELP, age_arg
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import read_run_log
from lab_attendant.store import samples
from lab_attendant.store.db import Store
from lab_attendant.store.deps import waiting_for
from lab_attendant.store.history import query_runs
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.validate import dumps, printable


def parse_states(text: str | None) -> list[RunState]:
    """'running,queued' -> states; an unknown name is a UserError listing the known ones."""
    if not text:
        return []
    try:
        return [RunState(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"unknown state in --state {text!r}; states: {', '.join(RunState)}") from None


def cmd_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UserError(f"--limit must be 0 (all) or more, got {args.limit}")
    keys = columns.parse_format(args.format) if args.format else columns.LIST_DEFAULT
    store = Store(cfg.db_path)
    runs = query_runs(store, states=parse_states(args.state), kind=args.kind,
                      schedule=args.schedule, name=args.name, since_s=args.since,
                      limit=min(args.limit, 2**62))
    if args.json:
        print(dumps([r.to_dict() for r in runs]))
        return 0
    if not runs:
        print("no runs" + (" match" if any((args.state, args.kind, args.schedule, args.name,
                                              args.since)) else "; submit one with "
                           "`lab-attendant submit KIND`"))
        return 0
    out = console()
    # the columns asked for by --format are all shown (rich cuts them if they must); the default
    # set drops its least useful columns first on a narrow terminal
    out.print(columns.runs_table(out, runs, waiting_for(store, runs), keys=keys,
                                 fit=not args.format))
    return 0


def cmd_show(cfg: Config, args: argparse.Namespace) -> int:
    store = Store(cfg.db_path)
    run = store.must_get(args.id)
    if args.output is not None:
        return print_output(run, args.output)
    events = store.events(run.id)
    guard_events = store.guard_events(run_id=run.id)
    summary = samples.summarize(samples.load_from(store, run.id), cfg.guards.resume_below_c)
    waits = waiting_for(store, [run]).get(run.id)
    if args.json:
        out = run.to_dict()
        out["waiting_for"] = waits
        out["events"] = [e.to_dict() for e in events]
        out["guard_events"] = [g.to_dict() for g in guard_events]
        out["samples"] = summary and summary.to_dict()
        print(dumps(out))
        return 0
    console().print(run_details(run, events, guard_events, waits, sensors=summary))
    return 0


RENDER_MAX_BYTES = 4 * 1024**2   # larger Markdown is printed raw: rendering it would take long


def print_output(run: Any, name: str) -> int:
    """One output file: Markdown rendered on a terminal, the bytes as they are in a pipe. No
    NAME: the first human one (.md, .txt) `show` lists."""
    if not name:
        files = output_files(run)
        if not files:
            raise UserError(f"run {run.id} has no outputs ({run.state}); `lab-attendant show "
                            f"{run.id}` says why")
        name = files[0].relative_to(Path(run.run_dir) / "output").as_posix()
    try:
        fh, size_bytes = run_outputs.open_output(run, name)
    except LookupError as exc:
        raise UserError(str(exc)) from None
    with fh:
        out = console()
        if out.is_terminal and name.endswith(".md") and size_bytes <= RENDER_MAX_BYTES:
            out.print(Markdown(fh.read().decode("utf-8", "replace"), hyperlinks=False))
            return 0
        if out.is_terminal:   # text on a terminal: control characters dropped by the console
            out.print(Text(fh.read().decode("utf-8", "replace")), end="")
            return 0
        sys.stdout.flush()
        shutil.copyfileobj(fh, sys.stdout.buffer)
    return 0


def cmd_logs(cfg: Config, args: argparse.Namespace) -> int:
    store = Store(cfg.db_path)
    run = store.must_get(args.id)
    shown, last_progress = 0, None
    while True:
        lines = read_run_log(cfg.paths.logs_dir, run.id, run.needs_paging)
        for line in lines[shown:]:
            print(line, flush=True)
        shown = len(lines)
        if not args.follow or run.state in TERMINAL:
            if args.follow:
                print(f"lab-attendant: run {run.id} {run.state}: {printable(run.reason)}",
                      file=sys.stderr)
            return 0
        progress = (run.state, run.progress_done, run.progress_total)
        if progress != last_progress:   # progress goes to stderr: stdout stays the run's output
            print(f"lab-attendant: run {run.id} {run.state}, progress {progress_text(run)}",
                  file=sys.stderr, flush=True)
            last_progress = progress
        time.sleep(0.5)
        run = store.must_get(args.id)


def cmd_kinds(cfg: Config, args: argparse.Namespace) -> int:
    kinds = registry(cfg.worker.extra_kinds).values()
    if args.json:
        print(dumps([{"name": k.name, "help": k.help, "needs_paging": k.needs_paging,
                      "params": [{"name": p.name, "type": p.type, "required": p.required,
                                  "default": p.default, "help": p.help} for p in k.params]}
                     for k in kinds], default=str))
        return 0
    for kind in kinds:
        flag = " [needs --experimental-paging]" if kind.needs_paging else ""
        print(f"{kind.name}{flag}\n    {kind.help}")
        for p in kind.params:
            req = "required" if p.required else f"default {p.default!r}"
            print(f"    -p {p.name}=<{p.type}>  ({req}) {p.help}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("list", help="list runs, newest first (squeue/sacct)")
    ls.add_argument("--state", metavar="S[,S]", help="only these states, e.g. running,queued "
                    f"(states: {', '.join(RunState)})")
    ls.add_argument("--kind", help="only runs of this kind")
    ls.add_argument("--schedule", metavar="ID", help="only runs fired by this schedule")
    ls.add_argument("--name", help="only runs with this name (a glob: 'nightly-*')")
    ls.add_argument("--since", type=age_arg, metavar="AGE",
                    help=f"only runs submitted in the last AGE ({AGE_HELP})")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50, 0 = all)")
    ls.add_argument("--format", metavar="COLS", help="the columns to show, comma-separated, e.g. "
                    "id,name,state,elapsed,exit,maxrss,maxgpu (sacct-like; columns: "
                    f"{', '.join(c.name.lower() for c in columns.COLUMNS.values())})")
    ls.add_argument("--json", action="store_true", help="machine-readable: a JSON list of runs")
    ls.set_defaults(fn=cmd_list)

    sh = sub.add_parser("show", help="one run: state, params, outputs, metrics, events")
    sh.add_argument("id", type=int, help="run id (see `lab-attendant list`)")
    sh.add_argument("--json", action="store_true", help="machine-readable: the run as JSON")
    sh.add_argument("--output", nargs="?", const="", metavar="NAME",
                    help="print an output file instead (default: the first .md/.txt one); "
                    "Markdown is rendered on a terminal, printed as it is in a pipe")
    sh.set_defaults(fn=cmd_show)

    lg = sub.add_parser("logs", help="a run's output (stdout and stderr of its worker)")
    lg.add_argument("id", type=int, help="run id")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing until the run ends; progress lines go to stderr")
    lg.set_defaults(fn=cmd_logs)

    k = sub.add_parser("kinds", help="job kinds and their params")
    k.add_argument("--json", action="store_true", help="machine-readable: kinds with params")
    k.set_defaults(fn=cmd_kinds)
