"""What each dashboard page and API answer shows, read from a read-only session: plain dicts, so
the HTML templates and the JSON API show the same values.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lab_attendant import outputs as run_outputs
from lab_attendant.config import Config
from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import read_run_log
from lab_attendant.store.figures import elapsed_s, fraction, tokens_per_s
from lab_attendant.store.history import runs_select
from lab_attendant.store.samples import load, summarize
from lab_attendant.store.states import ACTIVE, RunState
from lab_attendant.store.tables import GUARD_READINGS, CotenantRow, GuardEvent, Meta, Run, RunEvent

LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 256 * 1024             # of a run's log read per page view, from its end
OUTPUT_PREVIEW_BYTES = 512 * 1024       # markdown outputs rendered (run page, output page) up to this
MAX_RUN_ID = 2**63 - 1                  # SQLite's largest rowid: a larger one is no run (404)
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
    return run_outputs.listed(run)


def open_output(run: Run, name: str) -> tuple[BinaryIO, int]:
    """One listed output by name (a swap after listing is refused too); (file, size in bytes)."""
    if name not in {o["name"] for o in outputs(run)}:
        raise LookupError(f"run {run.id} has no output {name!r}")
    return run_outputs.open_output(run, name)


def read_output_text(run: Run, name: str, max_bytes: int = OUTPUT_PREVIEW_BYTES) -> str | None:
    """An output's text for rendering, None when it is larger than `max_bytes`."""
    fh, size_bytes = open_output(run, name)
    with fh:
        return None if size_bytes > max_bytes else fh.read(max_bytes).decode("utf-8", "replace")


def get_run(s: Session, run_id: int) -> Run:
    run = s.get(Run, run_id) if 1 <= run_id <= MAX_RUN_ID else None
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
    return read_run_log(cfg.paths.logs_dir, run.id, run.needs_paging,
                        max_bytes=LOG_TAIL_BYTES)[-LOG_TAIL_LINES:]


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
