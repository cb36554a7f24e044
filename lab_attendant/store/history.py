"""Past runs: the filtered run query behind `list`, and the figures of `stats` (sacct-like, printed
by lab_attendant.cli.stats): counts by state, success rate, mean and p95 duration and the tokens/s
trend per kind over a window.

Success rate = succeeded / runs that finished (terminal, less cancelled and skipped ones, which
say nothing about the kind). Durations are of succeeded runs (worker start to end), so a crash
in its first second does not make a kind look fast. A run belongs to the window it was submitted in.
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any, Iterable

from sqlalchemy import Select, select

from lab_attendant.store.db import Store
from lab_attendant.store.figures import elapsed_s, tokens_per_s
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.store.tables import Run

NOT_A_VERDICT = frozenset({RunState.CANCELLED, RunState.SKIPPED})
FAILED_STATES = TERMINAL - NOT_A_VERDICT - {RunState.SUCCEEDED}


def runs_select(*, states: Iterable[RunState] = (), kind: str | None = None,
                schedule: str | None = None, name: str | None = None, since: float | None = None,
                until: float | None = None, limit: int | None = None,
                oldest_first: bool = False) -> Select:
    """The runs a filter selects, newest first (`list`, the dashboard's runs table); since and
    until bound the submit time (unix time), name is a glob."""
    q = select(Run)
    states = list(states)
    if states:
        q = q.where(Run.state.in_(states))
    if kind:
        q = q.where(Run.kind == kind)
    if schedule:
        q = q.where(Run.schedule_id == schedule)
    if name:
        q = q.where(Run.name.op("GLOB")(name))
    if since is not None:
        q = q.where(Run.submitted_at >= since)
    if until is not None:
        q = q.where(Run.submitted_at <= until)
    q = q.order_by(Run.id if oldest_first else Run.id.desc())
    return q.limit(limit) if limit else q


def query_runs(store: Store, *, since_s: float | None = None, **filters: Any) -> list[Run]:
    """runs_select's runs from the store; since_s: submitted in the last since_s seconds."""
    since = None if since_s is None else time.time() - since_s
    with store.read() as s:
        return list(s.scalars(runs_select(since=since, **filters)))


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(runs: list[Run]) -> dict[str, Any]:
    counts = Counter(str(r.state) for r in runs)
    ok = [r for r in runs if r.state is RunState.SUCCEEDED]
    finished = sum(1 for r in runs if r.state in TERMINAL and r.state not in NOT_A_VERDICT)
    durations = [d for d in (elapsed_s(r) for r in ok) if d is not None]
    by_day: dict[str, list[float]] = defaultdict(list)
    for r in ok:
        tps = tokens_per_s(r)
        if tps is not None:
            by_day[time.strftime("%Y-%m-%d", time.localtime(r.ended_at))].append(tps)
    trend = [{"day": day, "runs": len(v), "tokens_per_s": sum(v) / len(v)}
             for day, v in sorted(by_day.items())]
    all_tps = [x for v in by_day.values() for x in v]
    return {"runs": len(runs), "by_state": dict(sorted(counts.items())),
            "succeeded": len(ok), "failed": sum(1 for r in runs if r.state in FAILED_STATES),
            "finished": finished, "success_rate": len(ok) / finished if finished else None,
            "mean_duration_s": sum(durations) / len(durations) if durations else None,
            "p95_duration_s": p95(durations),
            "tokens_per_s": sum(all_tps) / len(all_tps) if all_tps else None,
            "tokens_per_s_by_day": trend}


def stats(store: Store, *, since_s: float | None, kind: str | None) -> dict[str, Any]:
    runs = query_runs(store, since_s=since_s, kind=kind, oldest_first=True)
    per_kind: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        per_kind[r.kind].append(r)
    now = time.time()
    return {"from": now - since_s if since_s is not None else (runs[0].submitted_at if runs
                                                                else None),
            "to": now, "since_s": since_s, "kind": kind, "total": summarize(runs),
            "kinds": {k: summarize(v) for k, v in sorted(per_kind.items())}}
