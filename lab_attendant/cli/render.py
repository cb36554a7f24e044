"""What a person reads about runs, built with rich: durations, relative and local times with
their zone, sizes in KiB/MiB/GiB, rounded metrics, the runs table and one run's details.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console, Group
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from jobs.contract.units import format_duration, format_size
from lab_attendant.store.figures import elapsed_s, eta_s, fraction
from lab_attendant.store.states import ACTIVE, TERMINAL, RunState
from lab_attendant.validate import printable

STATE_STYLE = {RunState.SUCCEEDED: "green", RunState.RUNNING: "cyan", RunState.STARTING: "cyan",
               RunState.QUEUED: "", RunState.HELD: "yellow", RunState.SKIPPED: "dim",
               RunState.CANCELLED: "magenta"}
PIPE_WIDTH = 160      # columns when stdout is not a terminal and $COLUMNS is unset


class _Console(Console):
    """Data is never markup here: markup and emoji codes are off, so a run named '[/x]' or
    '[link=file:///etc/passwd]' prints as typed, and control characters (ESC) are dropped from
    every text segment (not from rich's own cursor controls, which Live needs)."""

    def on_broken_pipe(self) -> None:
        # rich would exit 1 here; the CLI's own handler ends a closed pipe quietly with 0
        raise BrokenPipeError

    def render(self, renderable: Any, options: Any = None) -> Iterable[Segment]:
        for seg in super().render(renderable, options):
            yield seg if seg.control else Segment(printable(seg.text), seg.style)


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return _Console(file=stream, width=width, highlight=False, soft_wrap=False, markup=False,
                    emoji=False)


# -- units ----------------------------------------------------------------------------------------
def local_time(ts: float | None) -> str:
    """'2026-11-30 19:31:02 CET': local time with its zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)) if ts else "-"


def duration(seconds: float | None) -> str:
    """'0.4 s', '42 s', '3 min 05 s', '2 h 07 min', '3 d 04 h'; '-' for none."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return format_duration(seconds)


def ago(ts: float | None, now: float | None = None) -> str:
    """'3 min 05 s ago', 'in 2 h 00 min'."""
    if not ts:
        return "-"
    delta = (now or time.time()) - ts
    return f"{duration(delta)} ago" if delta >= 0 else f"in {duration(-delta)}"


def when(ts: float | None, now: float | None = None) -> str:
    return f"{local_time(ts)} ({ago(ts, now)})" if ts else "-"


def number_text(value: float) -> str:
    """Floats rounded to 3 significant digits (no exponent for ordinary magnitudes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e15:
        digits = max(0, 2 - int(math.floor(math.log10(abs(value))))) if value else 0
        return f"{value:,.{digits}f}"
    return f"{value:.3g}"


def metric(key: str, value: Any) -> str:
    """A metric as a person reads it: bytes as sizes, seconds as durations, floats rounded."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.endswith("bytes_per_s"):
            return f"{format_size(value)}/s"
        if key.endswith("_per_s"):                       # tokens_per_s -> '12.3 tokens/s'
            return f"{number_text(value)} {key[:-6].replace('_', ' ')}/s"
        if "bytes" in key.split("_"):                    # kv_cache_peak_bytes, engine_bytes_read
            return format_size(value)
        if key.endswith("_s"):
            return duration(value)
        return number_text(value)
    if isinstance(value, (list, dict)):
        text = ", ".join(f"{k}={metric(k, v)}" for k, v in value.items()) if isinstance(
            value, dict) else ", ".join(metric(key, v) for v in value)
        return text
    return str(value)


# -- a run's progress -----------------------------------------------------------------------------
def phase_text(run: Any) -> str:
    """'reading notes 3/6' with a phase label; '3/6 notes' without one."""
    count = f"{run.progress_done}/{run.progress_total}"
    phase = getattr(run, "progress_phase", None)
    return f"{phase} {count}" if phase else f"{count} {run.progress_unit or ''}".rstrip()


def progress_cell(run: Any, width: int = 12):
    """A bar while the run waits or runs; the last reported count once it has ended."""
    frac = fraction(run)
    if frac is None:
        return Text("-" if run.state not in ACTIVE else "…")
    if run.state in TERMINAL:
        return Text(phase_text(run), style="dim")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=run.progress_total, completed=min(run.progress_done or 0,
                                                                    run.progress_total),
                            width=width), Text(f"{frac:4.0%}"))
    return bar


def progress_text(run: Any, now: float | None = None) -> str:
    frac = fraction(run)
    if frac is None:
        return "-"
    text = f"{phase_text(run)} ({frac:.0%})"
    eta = eta_s(run, now)
    return text + (f", about {duration(eta)} left" if eta is not None else "")


# -- tables ---------------------------------------------------------------------------------------
def state_text(run: Any) -> Text:
    return Text(str(run.state), style=STATE_STYLE.get(run.state, "red"))


def ellipsize(text: str, width: int) -> str:
    """`text` in at most `width` columns, cut at a word boundary with '…' when too long."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = text[:max(1, width - 1)]
    cut = head.rsplit(" ", 1)[0]
    if len(cut) < len(head) * 2 // 3:   # one long word (a path): a word cut would hide it all
        cut = head
    return cut.rstrip(" ,;:") + "…"


class Ellipsized:
    """A table cell cut at a word boundary to whatever width its column gets (rich's own
    ellipsis cuts mid-word)."""

    def __init__(self, text: str, min_width: int = 20) -> None:
        self.text, self.min_width = " ".join(text.split()), min_width

    def __rich_console__(self, console: Any, options: Any):
        yield Text(ellipsize(self.text, options.max_width), no_wrap=True, overflow="crop")

    def __rich_measure__(self, console: Any, options: Any) -> Measurement:
        return Measurement(min(len(self.text), self.min_width), max(1, len(self.text)))


def kv_table() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def output_files(run: Any) -> list[Path]:
    """The files a run wrote, the human ones (.md, .txt) first."""
    if not run.run_dir:
        return []
    out = Path(run.run_dir) / "output"
    files = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()
             and not p.name.startswith(".")] \
        if out.is_dir() else []
    return sorted(files, key=lambda p: (p.suffix not in (".md", ".txt"), str(p)))


def run_details(run: Any, events: list[Any], guard_events: list[Any], why: str | None = None,
                now: float | None = None, sensors: Any = None):
    """`show`: the run, its outputs, metrics and events, in words and units."""
    now = now or time.time()
    head = kv_table()
    title = f"run {run.id}" + (f" ({run.name})" if run.name else "")
    head.add_row("run", f"{title}: {run.kind}")
    head.add_row("state", Text.assemble(state_text(run), f": {why or run.reason}"))
    if run.params:
        head.add_row("params", "  ".join(f"{k}={metric(k, v)}" for k, v in sorted(run.params.items())))
    extra = [("priority", str(run.priority)), ("after", ", ".join(map(str, run.after))),
             ("attempt", f"{run.attempt} of {run.max_retries + 1}" if run.max_retries or
              run.retry_of else ""), ("retry of", str(run.retry_of or "")),
             ("schedule", run.schedule_id or ""), ("not before", when(run.not_before, now)
                                                   if run.not_before else ""),
             ("executor", f"{run.executor}, job {run.executor_job_id or '(not submitted)'}"
              if run.executor != "local" else ""),
             ("requested", next((e.reason for e in reversed(events) if e.kind == "requested"), "")),
             ("pid", str(run.pid or "")), ("exit", _exit_text(run)),
             ("peak memory", _peaks_text(run)),
             ("submitted", when(run.submitted_at, now)),
             ("started", when(run.started_at, now) if run.started_at else ""),
             ("ended", when(run.ended_at, now) if run.ended_at else "")]
    for key, value in extra:
        if value:
            head.add_row(key, value)
    spent = elapsed_s(run, now)
    if spent is not None:
        head.add_row("ran for" if run.state in TERMINAL else "running for", duration(spent))
    if run.progress_total:
        head.add_row("progress", progress_text(run, now))
    files = output_files(run)
    for i, f in enumerate(files):
        head.add_row("output" if i == 0 else "", f"{f}  ({format_size(f.stat().st_size)})")
    if run.result_path and Path(run.result_path) not in files:
        head.add_row("result", run.result_path)
    if run.log_path:
        head.add_row("log", f"{run.log_path}  (`lab-attendant logs {run.id}`)")
    parts: list[Any] = [head]
    if run.metrics:
        mt = Table(title="metrics", title_justify="left", box=None, show_header=False,
                   pad_edge=False)
        mt.add_column(style="bold", no_wrap=True)
        mt.add_column(overflow="fold")
        for key, value in sorted(run.metrics.items()):
            mt.add_row(key, metric(key, value))
        parts += [Text(""), mt]
    if sensors is not None:   # samples.Summary: the run's sensor history
        parts += [Text(""), sensors_table(sensors)]
    parts += [Text(""), _events_table(events, guard_events)]
    return Group(*parts)


def sensors_table(summary: Any) -> Table:
    st = Table(title=f"sensors ({summary.samples} samples over {duration(summary.span_s)})",
               title_justify="left", box=None, show_header=False, pad_edge=False)
    st.add_column(style="bold", no_wrap=True)
    st.add_column(overflow="fold")
    for series in summary.series:
        st.add_row(series.label, series.text())
    if summary.above_resume_s is not None:
        st.add_row(f"above {summary.resume_below_c:g} °C",
                   f"{duration(summary.above_resume_s)} (the thermal resume level)")
    if summary.throttle_reasons:
        st.add_row("throttled by", ", ".join(summary.throttle_reasons))
    return st


def _peaks_text(run: Any) -> str:
    """'RSS 1.2 GiB, GPU 3.4 GiB': the highest the guards read while it was active."""
    peaks = [f"{what} {format_size(n)}" for what, n in (("RSS", run.peak_rss_bytes),
                                                       ("GPU", run.peak_gpu_bytes)) if n]
    return ", ".join(peaks)


def _exit_text(run: Any) -> str:
    if run.signal:
        return f"killed by {run.signal}"
    return "" if run.exit_code is None else f"exit code {run.exit_code}"


def _events_table(events: list[Any], guard_events: list[Any]) -> Table:
    table = Table(title="events", title_justify="left", box=None, header_style="bold",
                  pad_edge=False)
    for name in ("AT", "WHAT", "REASON"):
        table.add_column(name, overflow="fold", no_wrap=name != "REASON")
    rows = [(e.at, f"{e.from_state or '-'} → {e.to_state}" if e.kind == "transition"
             else e.kind, e.reason) for e in events]
    rows += [(g.at, f"{g.guard} {g.action}", g.reason) for g in guard_events]
    for at, what, reason in sorted(rows, key=lambda r: r[0]):
        table.add_row(local_time(at), what, reason)
    return table
