"""Retries: a run that ends `failed` or `lost` with retries left gets a new queued run linked to
it (retry_of), admitted after an exponential back-off; `lab-attendant retry ID` does it by hand.

Guard kills (killed_thermal, oom), cancels, timeouts and skips are never retried automatically.
The daemon derives retries from the store (a failed/lost run with budget left and no retry yet),
so a crash between a run's end and its retry neither loses nor duplicates the retry.
"""
from __future__ import annotations

import time

from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session, aliased

from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.db import Store
from lab_attendant.store.lifecycle import RETRIED_STATES, must_get, new_run
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.store.tables import Run

MAX_RETRIES = 100

log = get_logger("lab_attendant.store.retry")


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Wait before attempt+1 after attempt `attempt` (1-based) failed: base, 2 base, 4 base, ..."""
    return min(max_s, base_s * 2 ** (attempt - 1))


def _retry(s: Session, old: Run, *, not_before: float | None, reason: str) -> Run:
    """The next attempt of `old`: Store.submit's row (lifecycle.new_run) with old's settings."""
    return new_run(s, kind=old.kind, params_json=old.params_json, priority=old.priority,
                   timeout_s=old.timeout_s, needs_paging=old.needs_paging, reason=reason,
                   schedule_id=old.schedule_id, max_retries=old.max_retries, name=old.name,
                   after=old.after, executor=old.executor, not_before=not_before, retry_of=old,
                   after_any=old.after_any, after_notok=old.after_notok,
                   singleton=old.singleton, notify=old.notify)


def ensure_retries(store: Store, *, base_s: float, max_s: float) -> list[Run]:
    """Queue the retry of every failed/lost run with retries left and none yet (one transaction,
    idempotent: the daemon calls it each tick)."""
    child = aliased(Run)
    q = select(Run).where(Run.state.in_(RETRIED_STATES), Run.attempt <= Run.max_retries,
                          ~exists().where(and_(child.retry_of == Run.id)))
    with store.read() as s:   # the common case, nothing to retry, takes no write lock
        if s.scalars(q.limit(1)).first() is None:
            return []
    made = []
    with store.write() as s:
        for old in s.scalars(q.order_by(Run.id)).all():
            wait = backoff_s(old.attempt, base_s, max_s)
            made.append(_retry(
                s, old, not_before=time.time() + wait,
                reason=f"retry {old.attempt} of {old.max_retries} of run {old.id} ({old.state}: "
                       f"{old.reason[:120]}), not before {wait:g} s"))
    for run in made:
        log.info("run retried", run_id=run.id, retry_of=run.retry_of, attempt=run.attempt)
    return made


def retry_now(store: Store, run_id: int, *, force: bool = False) -> Run:
    """`lab-attendant retry ID`: a new queued run with the same kind and params, linked to the
    old one, admitted at once. The old run must have ended and not have been retried already;
    `force` (`retry --force`, pueue's restart) re-runs a succeeded one, however often."""
    with store.write() as s:
        old = must_get(s, run_id)
        if old.state not in TERMINAL:
            raise UserError(f"run {run_id} is {old.state}; only a run that has ended can be "
                            f"retried (cancel it first: `lab-attendant cancel {run_id}`)")
        if old.state is RunState.SUCCEEDED and not force:
            raise UserError(f"run {run_id} succeeded; `lab-attendant retry --force {run_id}` "
                            "runs it again")
        again = s.scalars(select(Run.id).where(Run.retry_of == run_id)).first()
        if again is not None and not force:
            raise UserError(f"run {run_id} was already retried as run {again}; retry that one "
                            f"(or `retry --force {run_id}` for one more run of it)")
        return _retry(s, old, not_before=None,
                      reason=f"{'re-run' if force else 'retry'} of run {old.id} ({old.state}) "
                             "by user")
