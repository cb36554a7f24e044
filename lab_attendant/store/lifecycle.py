"""The one writer of a run's lifecycle: the row a new run starts as (submit, retry), the transition
function (state, reason, hold code, times, the event), and how a run's dependencies stand
(afterok / afterany / afternotok parents, and --singleton's runs of the same name).

Everything here works inside a transaction the caller opened (Store.write); no module outside
lab_attendant.store writes a run's state, hold_code or reason, and inside it only this one does.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from lab_attendant.errors import TransitionError, UserError
from lab_attendant.store.states import ACTIVE, TERMINAL, RunState, can_transition
from lab_attendant.store.tables import Run, RunEvent
from lab_attendant.validate import check_run_id

# Ends a retry follows (`max_retries`); guard kills, cancels, timeouts and skips are never retried.
RETRIED_STATES = frozenset({RunState.FAILED, RunState.LOST})
# How a parent stands (its retry chain's verdict), and the dependency types a run may name.
OK, PENDING, FAILED, MISSING = "succeeded", "pending", "failed", "missing"
AFTER_OK, AFTER_ANY, AFTER_NOTOK = "afterok", "afterany", "afternotok"
# The verdicts that meet each type; any other verdict but PENDING means it never can be met. A
# missing parent was pruned, and prune deletes only ended runs: it has ended, how is unknown.
MEETS = {AFTER_OK: frozenset({OK}), AFTER_ANY: frozenset({OK, FAILED, MISSING}),
         AFTER_NOTOK: frozenset({FAILED})}


def must_get(s: Session, run_id: int) -> Run:
    """The run in this transaction, or a UserError a person can act on."""
    check_run_id(run_id)
    run = s.get(Run, run_id)
    if run is None:
        raise UserError(f"no run {run_id}; see `lab-attendant list`")
    return run


def new_run(s: Session, *, kind: str, params_json: str, priority: int, timeout_s: float,
            needs_paging: bool, reason: str, schedule_id: str | None = None,
            max_retries: int = 0, name: str | None = None, after: Iterable[int] = (),
            executor: str = "local", not_before: float | None = None,
            retry_of: Run | None = None, after_any: Iterable[int] = (),
            after_notok: Iterable[int] = (), singleton: bool = False,
            notify: str | None = None) -> Run:
    """Insert a queued run and its creation event; a retry (`retry_of`) is the next attempt of
    that run and records on it which run retried it."""
    now = time.time()
    run = Run(kind=kind, params_json=params_json, priority=priority, timeout_s=timeout_s,
              needs_paging=needs_paging, submitted_at=now, state=RunState.QUEUED, reason=reason,
              schedule_id=schedule_id, max_retries=max_retries, name=name,
              after_json=json.dumps(sorted(set(after))), executor=executor,
              not_before=not_before, retry_of=retry_of and retry_of.id,
              after_any_json=json.dumps(sorted(set(after_any))),
              after_notok_json=json.dumps(sorted(set(after_notok))), singleton=singleton,
              notify=notify,
              attempt=1 if retry_of is None else retry_of.attempt + 1)
    s.add(run)
    s.flush()
    s.add(RunEvent(run_id=run.id, at=now, kind="transition", from_state=None,
                   to_state=RunState.QUEUED.value, reason=reason))
    if retry_of is not None:
        s.add(RunEvent(run_id=retry_of.id, at=now, kind="retry",
                       reason=f"retried as run {run.id}"))
    return run


def transition(s: Session, run: Run, dst: RunState, reason: str, **fields: Any) -> None:
    """The only code that writes runs.state: checks the table, stamps times, logs the event."""
    src = run.state
    if not can_transition(src, dst):
        raise TransitionError(f"run {run.id}: {src} -> {dst} is not allowed ({reason})")
    if "state" in fields or "reason" in fields:
        raise TransitionError("state and reason are transition()'s own arguments")
    now = time.time()
    run.state, run.reason = dst, reason
    if dst is not RunState.HELD:
        run.hold_code = None
    for key, value in fields.items():
        setattr(run, key, value)
    if dst is RunState.STARTING:
        run.started_at = now
    if dst in TERMINAL:
        run.ended_at = now
    s.add(RunEvent(run_id=run.id, at=now, kind="transition", from_state=src.value,
                   to_state=dst.value, reason=reason))


def change_hold(s: Session, run: Run, code: str, reason: str) -> None:
    """A held run is held for another reason (a user's hold replaces the daemon's): no state
    change, so no transition, but the same event log."""
    if run.state is not RunState.HELD:
        raise TransitionError(f"run {run.id} is {run.state}, not held ({reason})")
    run.hold_code, run.reason = code, reason
    s.add(RunEvent(run_id=run.id, at=time.time(), kind="hold", reason=reason))


# -- dependencies ---------------------------------------------------------------------------------
def outcome(s: Session, run_id: int) -> tuple[str, Run | None]:
    """How parent `run_id` stands, following its retry chain to the latest attempt."""
    run = s.get(Run, run_id)
    if run is None:
        return MISSING, None
    while run.state in TERMINAL and run.state is not RunState.SUCCEEDED:
        retry = s.scalars(select(Run).where(Run.retry_of == run.id).order_by(Run.id)
                          .limit(1)).first()
        if retry is None:
            break
        run = retry
    if run.state is RunState.SUCCEEDED:
        return OK, run
    if run.state not in TERMINAL or (run.state in RETRIED_STATES
                                     and run.attempt <= run.max_retries):
        return PENDING, run          # still to run, or a retry is coming
    return FAILED, run


@dataclass(frozen=True)
class Unmet:
    """One dependency of a run that is not met: parent id, type, the parent's verdict and the
    latest run of its retry chain (None when it no longer exists)."""
    parent: int
    type: str
    verdict: str
    last: Run | None

    @property
    def never(self) -> bool:
        """The parent has decided, and not the way this type waits for."""
        return self.verdict != PENDING


def dependencies(run: Run) -> list[tuple[str, int]]:
    """(type, parent id) for every parent the run names."""
    return ([(AFTER_OK, p) for p in run.after] + [(AFTER_ANY, p) for p in run.after_any]
            + [(AFTER_NOTOK, p) for p in run.after_notok])


def unmet(s: Session, run: Run) -> list[Unmet]:
    """Every dependency of `run` that is not met yet, or never will be."""
    out = []
    for dep_type, parent in dependencies(run):
        verdict, last = outcome(s, parent)
        if verdict not in MEETS[dep_type]:
            out.append(Unmet(parent, dep_type, verdict, last))
    return out


def singleton_blocker(s: Session, run: Run) -> Run | None:
    """For a --singleton run: another active run of the same name, which it waits for."""
    if not run.singleton or not run.name:
        return None
    return s.scalars(select(Run).where(Run.name == run.name, Run.id != run.id,
                                       Run.state.in_(ACTIVE)).order_by(Run.id).limit(1)).first()


def ready(s: Session, run: Run) -> bool:
    """Store.claim_next asks this inside its claim transaction."""
    if (run.after or run.after_any or run.after_notok) and unmet(s, run):
        return False
    return singleton_blocker(s, run) is None
