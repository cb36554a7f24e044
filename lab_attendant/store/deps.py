"""Run dependencies (`submit --after` afterok, `--afterany`, `--afternotok`, `--singleton`) and
user holds (`hold` / `release`): the store's operations for them; how a parent stands is judged in
lab_attendant.store.lifecycle.

A run with dependencies stays QUEUED; Store.claim_next takes it only once every one is met
(checked inside the claim's own transaction, so no race): afterok once the parent succeeded,
afterany once it ended however it ended, afternotok once it ended in any other way than success,
singleton while no other run of its name is starting or running. A parent is judged by its retry
chain: a parent that failed but will be retried (retries left) keeps its dependents waiting, and the
chain's last attempt decides. A dependency that can never be met (an afterok parent that failed for
good or no longer exists, an afternotok parent that succeeded) cancels the waiting dependent with
a reason naming it; `lab-attendant retry CHILD` queues the dependent again after the parent has
been retried by hand.
A user hold is HELD with hold_code "user": only `release` lifts it, never the daemon.
"""
from __future__ import annotations

from typing import Callable, Iterable

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from lab_attendant.errors import UserError
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.db import Store
from lab_attendant.store.lifecycle import (
    AFTER_ANY,
    AFTER_NOTOK,
    AFTER_OK,
    MEETS,
    MISSING,
    OK,
    PENDING,
    Unmet,
    change_hold,
    must_get,
    outcome,
    singleton_blocker,
    transition,
    unmet,
)
from lab_attendant.store.states import TERMINAL, WAITING, RunState
from lab_attendant.store.tables import Run
from lab_attendant.validate import check_run_id

USER_HOLD = "user"
# What a pending parent is waited for, in `list`'s REASON ("waiting for run 3 to end (running)").
_WAITS_TO = {AFTER_ANY: "end", AFTER_NOTOK: "fail"}

log = get_logger("lab_attendant.store.deps")


def _parent_text(parent: int, last: Run | None) -> str:
    if last is None:
        return f"run {parent} (no longer exists)"
    via = f" via retry {last.id}" if last.id != parent else ""
    return f"run {parent}{via} ({last.state})"


def check_after(store: Store, ids: Iterable[int], dep_type: str = AFTER_OK) -> list[int]:
    """At submit: every parent exists and can still meet `dep_type`, else a UserError saying so."""
    ids = sorted(set(ids))
    flag = "--after" if dep_type == AFTER_OK else f"--{dep_type}"
    with store.read() as s:
        for parent in ids:
            check_run_id(parent)
            verdict, last = outcome(s, parent)
            if verdict == MISSING:
                raise UserError(f"{flag} {parent}: there is no run {parent}; see "
                                "`lab-attendant list`")
            if verdict not in MEETS[dep_type] and verdict != PENDING:
                assert last is not None   # only a missing parent has no run
                fix = (f"Retry it first: `lab-attendant retry {last.id}`" if dep_type == AFTER_OK
                       else "Drop the flag, or name a run that has not ended")
                raise UserError(f"{flag} {parent}: run {parent} already ended {last.state} "
                                f"({last.reason}); a run {dep_type} it would never start. {fix}")
    return ids


def _waiting_text(s: Session, run: Run) -> str | None:
    parts = []
    pending = [u for u in unmet(s, run) if not u.never]
    ok = [u for u in pending if u.type == AFTER_OK]
    if ok:
        parts.append("after " + ", ".join(_parent_text(u.parent, u.last) for u in ok))
    parts += [f"waiting for run {u.parent} to {_WAITS_TO[u.type]} "
              f"({u.last.state if u.last else '?'})" for u in pending if u.type != AFTER_OK]
    blocker = singleton_blocker(s, run)
    if blocker is not None:
        parts.append(f"singleton: run {blocker.id} named '{run.name}' is {blocker.state}")
    return "; ".join(parts) or None


def waiting_for(store: Store, runs: Iterable[Run]) -> dict[int, str]:
    """For `list`/`watch`: why a queued run with dependencies has not started ("after run 3
    (running)", "waiting for run 3 to end (running)", "singleton: run 5 named 'x' is running")."""
    out = {}
    with store.read() as s:
        for run in runs:
            if run.state is RunState.QUEUED and (run.after or run.after_any or run.after_notok
                                                 or run.singleton):   # a held run shows its hold
                text = _waiting_text(s, run)
                if text:
                    out[run.id] = text
    return out


def _never_text(u: Unmet) -> str:
    if u.type == AFTER_OK:
        return _parent_text(u.parent, u.last) + (f": {u.last.reason}" if u.last else "")
    said = "succeeded" if u.verdict == OK else "no longer exists"
    return f"run {u.parent} {said}: {u.type} can never be met"


def cancel_unsatisfiable(store: Store) -> list[int]:
    """Daemon tick: cancel waiting runs with a dependency that can never be met (one transaction)."""
    q = select(Run).where(Run.state.in_(WAITING), or_(
        Run.after_json != "[]", Run.after_notok_json != "[]"))   # afterany is always met at last
    with store.read() as s:   # the common case: nothing waits on anything
        if s.scalars(q.limit(1)).first() is None:
            return []
    cancelled = []
    with store.write() as s:
        for run in s.scalars(q.order_by(Run.id)).all():
            never = [u for u in unmet(s, run) if u.never]
            if never:
                head = ("dependency failed, not started (afterok)"
                        if all(u.type == AFTER_OK for u in never)
                        else "dependency can never be met, not started")
                transition(s, run, RunState.CANCELLED,
                           f"{head}: {'; '.join(map(_never_text, never))}"[:500])
                cancelled.append(run.id)
    for rid in cancelled:
        log.info("run cancelled: a dependency can never be met", run_id=rid)
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
