"""Run dependencies (`submit --after`, afterok) and user holds (`hold` / `release`): the store's
operations for them; how a parent stands is judged in lab_attendant.store.lifecycle.

A run with `after` stays QUEUED; Store.claim_next takes it only once every parent has succeeded
(checked inside the claim's own transaction, so no race). A parent is judged by its retry chain:
a parent that failed but will be retried (retries left) keeps its dependents waiting, and the
chain's last attempt decides. A parent whose chain ends in any other terminal state (or that no
longer exists) cancels its waiting dependents, with a reason naming it; `lab-attendant retry
CHILD` queues the dependent again after the parent has been retried by hand.
A user hold is HELD with hold_code "user": only `release` lifts it, never the daemon.
"""
from __future__ import annotations

from typing import Callable, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.db import Store
from lab_attendant.store.lifecycle import (
    FAILED,
    MISSING,
    change_hold,
    must_get,
    outcome,
    transition,
    unmet,
)
from lab_attendant.store.states import TERMINAL, WAITING, RunState
from lab_attendant.store.tables import Run
from lab_attendant.validate import check_run_id

USER_HOLD = "user"

log = get_logger("lab_attendant.store.deps")


def _parent_text(parent: int, state: str, last: Run | None) -> str:
    if last is None:
        return f"run {parent} (no longer exists)"
    via = f" via retry {last.id}" if last.id != parent else ""
    return f"run {parent}{via} ({last.state})"


def check_after(store: Store, ids: Iterable[int]) -> list[int]:
    """At submit: every parent exists and can still succeed, else a UserError saying so."""
    ids = sorted(set(ids))
    with store.read() as s:
        for parent in ids:
            check_run_id(parent)
            state, last = outcome(s, parent)
            if state == MISSING:
                raise UserError(f"--after {parent}: there is no run {parent}; see "
                                "`lab-attendant list`")
            if state == FAILED:
                assert last is not None   # a FAILED outcome names the run that failed
                raise UserError(f"--after {parent}: run {parent} already ended {last.state} "
                                f"({last.reason}); a run after it would never start. Retry it "
                                f"first: `lab-attendant retry {last.id}`")
    return ids


def waiting_for(store: Store, runs: Iterable[Run]) -> dict[int, str]:
    """For `list`/`watch`: why a waiting run with parents has not started ("after run 3 (running)")."""
    out = {}
    with store.read() as s:
        for run in runs:
            if run.state is RunState.QUEUED and run.after:   # a held run shows its hold
                missing = unmet(s, run)
                if missing:
                    out[run.id] = "after " + ", ".join(_parent_text(*m) for m in missing)
    return out


def cancel_unsatisfiable(store: Store) -> list[int]:
    """Daemon tick: cancel waiting runs with a parent that can no longer succeed (one transaction)."""
    q = select(Run).where(Run.state.in_(WAITING), Run.after_json != "[]")
    with store.read() as s:   # the common case: nothing waits on anything
        if s.scalars(q.limit(1)).first() is None:
            return []
    cancelled = []
    with store.write() as s:
        for run in s.scalars(q.order_by(Run.id)).all():
            dead = [m for m in unmet(s, run) if m[1] in (FAILED, MISSING)]
            if dead:
                what = "; ".join(_parent_text(*m) + (f": {m[2].reason}" if m[2] else "")
                                 for m in dead)
                transition(s, run, RunState.CANCELLED,
                                  f"dependency failed, not started (afterok): {what}"[:500])
                cancelled.append(run.id)
    for rid in cancelled:
        log.info("run cancelled: a dependency failed", run_id=rid)
    return cancelled


def _each(store: Store, ids: list[int], act: Callable[[Session, Run], str]) -> list[str]:
    """All ids checked and changed in one transaction: a bad id changes nothing."""
    with store.write() as s:
        runs = [must_get(s, rid) for rid in ids]
        return [act(s, run) for run in runs]


def hold(store: Store, ids: list[int]) -> list[str]:
    """`hold`: keep these waiting runs from starting (all or none); one line per run."""
    return _each(store, ids, _hold_one)


def release(store: Store, ids: list[int]) -> list[str]:
    """`release`: let runs held by `hold` start again (all or none); one line per run."""
    return _each(store, ids, _release_one)


def _hold_one(s: Session, run: Run) -> str:
    reason = f"held by user; `lab-attendant release {run.id}` lets it start"
    if run.state is RunState.QUEUED:
        transition(s, run, RunState.HELD, reason, hold_code=USER_HOLD)
    elif run.state is RunState.HELD and run.hold_code != USER_HOLD:
        # Held by the daemon (paging, thermal, ...): the user's hold replaces it; no state change.
        change_hold(s, run, USER_HOLD, reason)
    elif run.state is RunState.HELD:
        return f"run {run.id} is already held by user"
    else:
        raise UserError(f"run {run.id} is {run.state}; only a waiting run (queued or held) can "
                        "be held" + ("" if run.state in TERMINAL else
                                     f" (stop it with `lab-attendant cancel {run.id}`)"))
    return f"run {run.id} held"


def _release_one(s: Session, run: Run) -> str:
    if run.state is RunState.HELD and run.hold_code == USER_HOLD:
        transition(s, run, RunState.QUEUED, "released by user")
        return f"run {run.id} released"
    if run.state is RunState.HELD:
        raise UserError(f"run {run.id} is held by the daemon, not by a user: {run.reason}")
    raise UserError(f"run {run.id} is {run.state}, not held; see `lab-attendant show {run.id}`")
