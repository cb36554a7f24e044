"""What each dashboard page and API answer shows, read from a read-only session: plain dicts, so
the HTML templates and the JSON API show the same values.
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import read_run_log
from lab_attendant.store.figures import elapsed_s, fraction, tokens_per_s
from lab_attendant.store.history import runs_select
from lab_attendant.store.samples import load, summarize
from lab_attendant.store.states import ACTIVE, RunState
from lab_attendant.store.tables import GUARD_READINGS, CotenantRow, GuardEvent, Meta, Run, RunEvent

LOG_TAIL_LINES = 200
OUTPUT_PREVIEW_BYTES = 512 * 1024       # markdown outputs rendered on the run page up to this size
RENDERED_OUTPUTS = ("insights.md", "refined.md", "matches.md")


def parse_when(text: str | None, what: str) -> float | None:
    """A form's datetime-local value (local time) or a unix time, as unix time."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UserError(f"{what} must be a date and time like 2026-11-30T02:30, got {text!r}") from None


def run_row(run: Run, now: float) -> dict[str, Any]:
    d = run.to_dict()
    d["state"] = run.state.value
    d["duration_s"] = elapsed_s(run, now)
    d["tokens_per_s"] = tokens_per_s(run)
    d["progress_fraction"] = fraction(run)
    return d


def runs(s: Session, *, state: str | None = None, kind: str | None = None,
         schedule: str | None = None, since: str | None = None, until: str | None = None,
         limit: int = 200) -> list[dict[str, Any]]:
    try:
        states = [RunState(state)] if state else []
    except ValueError:
        raise UserError(f"unknown state {state!r}; states: {', '.join(RunState)}") from None
    q = runs_select(states=states, kind=kind, schedule=schedule,
                    since=parse_when(since, "since"), until=parse_when(until, "until")).limit(limit)
    now = time.time()
    return [run_row(r, now) for r in s.scalars(q)]


def choices(s: Session) -> dict[str, list[str]]:
    """Values the filters offer: kinds and schedules that occur in the store."""
    kinds = sorted(k for (k,) in s.execute(select(Run.kind).distinct()))
    scheds = sorted(x for (x,) in s.execute(select(Run.schedule_id).distinct()) if x)
    return {"states": [st.value for st in RunState], "kinds": kinds, "schedules": scheds}


def counts(s: Session) -> dict[str, int]:
    return {st.value: n for st, n in s.execute(select(Run.state, func.count()).group_by(Run.state))}


def outputs(run: Run) -> list[dict[str, Any]]:
    """Files in the run's output folder (top level, regular files only)."""
    if not run.run_dir:
        return []
    folder = Path(run.run_dir) / "output"
    if not folder.is_dir():
        return []
    return [{"name": p.name, "size_bytes": p.stat().st_size, "markdown": p.suffix == ".md"}
            for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()]


def output_path(run: Run, name: str) -> Path:
    """One listed output by name: nothing outside the run's output folder can be asked for."""
    if name not in {o["name"] for o in outputs(run)}:
        raise UserError(f"run {run.id} has no output {name!r}")
    if not run.run_dir:
        raise UserError(f"run {run.id} has no run folder")
    return Path(run.run_dir) / "output" / name


def get_run(s: Session, run_id: int) -> Run:
    run = s.get(Run, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    return run


def run_detail(s: Session, cfg: Config, run_id: int) -> dict[str, Any]:
    run = get_run(s, run_id)
    rows = load(s, run_id)
    summary = summarize(rows, cfg.guards.resume_below_c)
    events = s.scalars(select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id))
    guards = s.scalars(select(GuardEvent).where(GuardEvent.run_id == run_id)
                       .order_by(GuardEvent.id))
    return {
        "run": run_row(run, time.time()),
        "events": [e.to_dict() for e in events],
        "guard_events": [g.to_dict() for g in guards],
        "samples": [r.to_dict() for r in rows],
        "summary": summary and summary.to_dict(),
        "outputs": outputs(run),
        "active": run.state in ACTIVE,
    }


def log_tail(cfg: Config, run: Run) -> list[str]:
    return read_run_log(cfg.paths.logs_dir, run.id, run.needs_paging)[-LOG_TAIL_LINES:]


def guard_timeline(s: Session, limit: int = 300) -> dict[str, Any]:
    events = list(s.scalars(select(GuardEvent).order_by(GuardEvent.id.desc()).limit(limit)))
    return {"events": [g.to_dict() for g in reversed(events)],
            "cotenants": [c.to_dict() for c in s.scalars(select(CotenantRow))],
            "readings": Meta.read(s, GUARD_READINGS)}


def schedules(s: Session, cfg: Config) -> list[dict[str, Any]]:
    from lab_attendant.scheduler import next_fire_times  # APScheduler's trigger only, no scheduler
    out = []
    for sched, nxt in next_fire_times(cfg):
        last = s.scalars(select(Run).where(Run.schedule_id == sched.id)
                         .order_by(Run.id.desc()).limit(1)).first()
        out.append({"id": sched.id, "cron": sched.cron, "kind": sched.kind,
                    "timezone": sched.timezone or "local", "params": sched.params,
                    "next_fire_time": nxt.timestamp() if nxt else None,
                    "last_run": last and run_row(last, time.time())})
    return out
