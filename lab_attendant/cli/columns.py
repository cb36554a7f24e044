"""The runs tables' columns (`list`, `list --format`, `watch`): what each cell shows, which columns a
narrow terminal drops first, and the names `--format` takes (sacct's too: JobID, MaxRSS, ExitCode).

A table is fitted to the console before rich sees it: columns are dropped, least useful first,
until the rest fits at their natural widths, so ID and STATE are never cut to 'N…'.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from jobs.contract.units import format_size
from lab_attendant.cli.render import (
    Ellipsized,
    ago,
    duration,
    local_time,
    number_text,
    phase_text,
    progress_cell,
    state_text,
)
from lab_attendant.errors import UserError
from lab_attendant.store.figures import elapsed_s, eta_s, tokens_per_s
from lab_attendant.store.states import RunState

KEEP = 1000        # a `keep` this high is never dropped (ID, STATE)
GAP = 2            # columns apart: rich's padding (0, 1) on both sides, no edge padding


@dataclass(frozen=True)
class Row:
    """What a cell may need besides the run: the time now, why it waits, live worker readings."""
    run: Any
    now: float
    why: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    name: str                          # the header
    cell: Callable[[Row], Any]         # str or a rich renderable
    keep: int                          # narrow terminals drop the lowest first
    justify: str = "left"
    shrink_to: int | None = None       # a column that may be cut (with '…') down to this width
    max_width: int | None = None
    ratio: int | None = None           # takes what is left of the width (REASON)
    help: str = ""


def _reason(r: Row) -> Any:
    run, reason = r.run, r.why or r.run.reason
    if run.state is RunState.QUEUED and run.not_before and run.not_before > r.now:
        reason = f"starts {ago(run.not_before, r.now)} (--begin or back-off); {reason}"
    return Ellipsized(reason)


def _exit(r: Row) -> str:
    run = r.run
    return run.signal or ("-" if run.exit_code is None else str(run.exit_code))


def _size(n: int | None) -> str:
    return format_size(n) if n else "-"


def _tokens(run: Any) -> str:
    tps = tokens_per_s(run)
    return "-" if tps is None else number_text(tps)


def _count(r: Row) -> str:
    run = r.run
    if not run.progress_total:
        return "-"
    return phase_text(run)


COLUMNS: dict[str, Column] = {c.name.lower(): c for c in (
    Column("ID", lambda r: str(r.run.id), KEEP, justify="right", help="run id"),
    Column("NAME", lambda r: r.run.name or "", 36, shrink_to=6, max_width=16, help="--name"),
    Column("KIND", lambda r: r.run.kind, 40, help="job kind"),
    Column("STATE", lambda r: state_text(r.run), KEEP, help="run state"),
    Column("PROGRESS", lambda r: progress_cell(r.run), 60, help="bar, or the last count"),
    Column("PHASE", _count, 65, help="labelled count: 'reading notes 3/6'"),
    Column("ELAPSED", lambda r: duration(elapsed_s(r.run, r.now)), 32, justify="right",
           help="time since the worker started"),
    Column("ETA", lambda r: duration(eta_s(r.run, r.now)), 50, justify="right",
           help="time left at the pace so far"),
    Column("TOK/S", lambda r: _tokens(r.run), 20, justify="right", help="tokens per second"),
    Column("RSS", lambda r: _size(r.worker.get("rss_bytes")), 10, justify="right",
           help="worker tree RSS now"),
    Column("PRI", lambda r: str(r.run.priority), 10, justify="right", help="priority"),
    Column("SUBMITTED", lambda r: ago(r.run.submitted_at, r.now), 20, help="when submitted"),
    Column("START", lambda r: local_time(r.run.running_at or r.run.started_at), 15,
           help="local start time"),
    Column("END", lambda r: local_time(r.run.ended_at), 15, help="local end time"),
    Column("REASON", _reason, 90, shrink_to=20, ratio=1, help="why it is in its state"),
    Column("EXIT", _exit, 25, justify="right", help="exit code or signal (sacct ExitCode)"),
    Column("MAXRSS", lambda r: _size(r.run.peak_rss_bytes), 25, justify="right",
           help="peak worker tree RSS (sacct MaxRSS)"),
    Column("MAXGPU", lambda r: _size(r.run.peak_gpu_bytes), 25, justify="right",
           help="peak GPU memory of the worker"),
    Column("EXECUTOR", lambda r: r.run.executor, 5, help="local or slurm"),
    Column("JOB", lambda r: r.run.executor_job_id or "-", 5, help="Slurm job id"),
    Column("ATTEMPT", lambda r: str(r.run.attempt), 5, justify="right", help="retry attempt"),
    Column("TIMEOUT", lambda r: duration(r.run.timeout_s), 5, justify="right",
           help="its time limit"),
)}
# sacct's and squeue's names for the same things
ALIASES = {"jobid": "id", "jobname": "name", "submit": "submitted", "exitcode": "exit",
           "maxgpumem": "maxgpu", "priority": "pri", "timelimit": "timeout", "start": "start",
           "end": "end", "elapsedraw": "elapsed", "tokens_per_s": "tok/s", "nodelist": "executor"}
LIST_DEFAULT = ("id", "name", "kind", "state", "progress", "elapsed", "pri", "submitted", "reason")
WATCH_RUNNING = ("id", "name", "kind", "state", "progress", "phase", "elapsed", "eta", "tok/s",
                 "rss")


def parse_format(text: str) -> list[str]:
    """'id,state,MaxRSS,ExitCode' -> column keys; an unknown name says which ones exist."""
    keys = []
    for word in (w.strip().lower() for w in text.split(",") if w.strip()):
        key = ALIASES.get(word, word)
        if key not in COLUMNS:
            raise UserError(f"unknown column {word!r} in --format; columns: "
                            f"{', '.join(c.name for c in COLUMNS.values())} (sacct's JobID, "
                            "MaxRSS, ExitCode, Submit, Priority and Timelimit work too)")
        keys.append(key)
    if not keys:
        raise UserError("--format needs at least one column, e.g. --format id,state,exit,maxrss")
    return keys


def _width(console: Console, cell: Any) -> int:
    if isinstance(cell, str):
        return Text(cell).cell_len
    return Measurement.get(console, console.options, cell).maximum


def table(console: Console, keys: Sequence[str], rows: Sequence[Row], *, fit: bool = True,
          expand: bool = False) -> Table:
    """A table of `keys` columns; with `fit`, the least useful columns are dropped until the
    rest fit the console at their natural widths (shrinkable ones at their `shrink_to`)."""
    cols = [COLUMNS[k] for k in keys]
    cells = [[c.cell(r) for c in cols] for r in rows]
    widths = []
    for i, c in enumerate(cols):
        natural = max([len(c.name), *(_width(console, row[i]) for row in cells)])
        widths.append(min(natural, c.max_width or natural))
    need = [min(w, c.shrink_to) if c.shrink_to else w for w, c in zip(widths, cols)]
    kept = list(range(len(cols)))
    while fit and sum(need[i] for i in kept) + GAP * (len(kept) - 1) > console.width:
        droppable = [i for i in kept if cols[i].keep < KEEP]
        if not droppable:
            break
        kept.remove(min(droppable, key=lambda i: cols[i].keep))
    # The room left goes to the shrinkable columns (NAME), the most useful first, each up to its
    # natural width; the ratio column (REASON) takes the rest. Each gets a width of its own, so
    # rich never takes it back from ID or STATE.
    room = console.width - GAP * (len(kept) - 1) - sum(need[i] for i in kept)
    width = {i: need[i] for i in kept}
    for i in sorted((i for i in kept if cols[i].shrink_to and not cols[i].ratio),
                    key=lambda i: -cols[i].keep):
        extra = max(0, min(room, widths[i] - need[i])) if fit else widths[i] - need[i]
        width[i] += extra
        room -= extra
    out = Table(box=None, pad_edge=False, header_style="bold", expand=expand)
    for i in kept:
        c = cols[i]
        # what may not shrink gets its natural width as its minimum: rich would cut it otherwise
        out.add_column(c.name, no_wrap=True, overflow="ellipsis", justify=c.justify,  # type: ignore[arg-type]
                       min_width=c.shrink_to if c.shrink_to and not c.ratio else width[i],
                       max_width=width[i] if c.shrink_to and not c.ratio else c.max_width,
                       ratio=c.ratio)
    for row in cells:
        out.add_row(*(row[i] for i in kept))
    return out


def runs_table(console: Console, runs: Sequence[Any], why: dict[int, str] | None = None,
               now: float | None = None, keys: Sequence[str] = LIST_DEFAULT,
               fit: bool = True) -> Table:
    """`list`: one row per run; REASON ends in an ellipsis where it is cut, never mid-word."""
    now = now or time.time()
    why = why or {}
    rows = [Row(r, now, why.get(r.id)) for r in runs]
    return table(console, keys, rows, fit=fit, expand="reason" in keys)
