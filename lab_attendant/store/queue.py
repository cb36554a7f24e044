"""Queue-wide controls and changes to waiting runs: pause/resume, the run-time parallelism
override (`parallel N`), `update` of a waiting run, and the selection behind bulk cancel/hold/release.

The controls are a meta row, so the CLI sets them without talking to the daemon (which reads them
each tick) and a restarted daemon keeps them. Nothing here writes a run's state: `update` changes
only what a submit chose (priority, begin, timeout, params), and only while the run waits.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

from lab_attendant.errors import UserError
from lab_attendant.store.db import Store
from lab_attendant.store.deps import USER_HOLD
from lab_attendant.store.history import runs_select
from lab_attendant.store.lifecycle import must_get
from lab_attendant.store.states import TERMINAL, WAITING, RunState
from lab_attendant.store.tables import Meta, Run, RunEvent

QUEUE_CONTROL = "queue_control"     # meta key
MAX_PARALLEL = 1024                 # as limits.max_concurrent's range in lab_attendant.validate


@dataclass(frozen=True)
class Controls:
    """What `pause` and `parallel` set; the defaults are an untouched queue."""
    paused_since: float | None = None    # unix time of `pause`; None: the daemon admits runs
    max_concurrent: int | None = None    # `parallel N`; None: the config's limits.max_concurrent

    def parallel(self, configured: int) -> int:
        return configured if self.max_concurrent is None else self.max_concurrent


def _read(s: Any) -> Controls:
    raw = Meta.read(s, QUEUE_CONTROL) or {}
    return Controls(**{k: v for k, v in raw.items() if k in Controls.__dataclass_fields__})


def controls(store: Store) -> Controls:
    """The queue's controls now (the daemon reads them every tick)."""
    with store.read() as s:
        return _read(s)


def _change(store: Store, change: Callable[[Controls], Controls]) -> tuple[Controls, Controls]:
    """(before, after) of one read-modify-write in a single transaction."""
    with store.write() as s:
        before = _read(s)
        after = change(before)
        if after != before:
            s.merge(Meta.of(QUEUE_CONTROL, asdict(after)))
        return before, after


def pause(store: Store) -> tuple[bool, Controls]:
    """`pause`: the daemon admits nothing until `resume`; running runs go on. A second pause
    keeps the first one's time. Returns (changed, the controls now)."""
    before, after = _change(store, lambda c: c if c.paused_since is not None
                            else replace(c, paused_since=time.time()))
    return before != after, after


def resume(store: Store) -> tuple[bool, Controls]:
    """`resume`: admissions go on. Returns (changed, the controls now)."""
    before, after = _change(store, lambda c: replace(c, paused_since=None))
    return before != after, after


def set_parallel(store: Store, n: int | None) -> Controls:
    """`parallel N` (None: back to the config's max_concurrent)."""
    if n is not None and not 1 <= n <= MAX_PARALLEL:
        raise UserError(f"parallel must be from 1 to {MAX_PARALLEL} runs at once, got {n}; "
                        "`lab-attendant parallel --reset` goes back to the config's value")
    return _change(store, lambda c: replace(c, max_concurrent=n))[1]


# -- update ----------------------------------------------------------------------------------------
EDITABLE = ("priority", "not_before", "timeout_s", "params_json", "needs_paging", "executor")


def edit(store: Store, run_id: int, **changes: Any) -> list[str]:
    """`update ID`: set what a submit chose on a waiting run, in one transaction with the check
    that it still waits; returns the fields that changed, in EDITABLE's names (an event lists
    them with old and new values)."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    with store.write() as s:
        run = must_get(s, run_id)
        if run.state not in WAITING:
            raise UserError(f"run {run_id} is {run.state}; only a waiting run (queued or held) "
                            "can be updated" + ("" if run.state in TERMINAL else
                                                f" (`lab-attendant cancel {run_id}` stops it)"))
        changed, said = [], []
        for key, value in changes.items():
            if getattr(run, key) != value:
                changed.append(key)
                said.append(f"{key} {_shown(getattr(run, key))} -> {_shown(value)}")
                setattr(run, key, value)
        if changed:
            s.add(RunEvent(run_id=run.id, at=time.time(), kind="update",
                           reason=("updated by user: " + "; ".join(said))[:2000]))
        return changed


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)[:200] if not isinstance(value, str) \
        else value[:200]


# -- bulk selection --------------------------------------------------------------------------------
def is_cancellable(run: Run) -> bool:
    return run.state not in TERMINAL


def is_holdable(run: Run) -> bool:
    return run.state is RunState.QUEUED or (run.state is RunState.HELD
                                            and run.hold_code != USER_HOLD)


def is_releasable(run: Run) -> bool:
    return run.state is RunState.HELD and run.hold_code == USER_HOLD


def select_runs(store: Store, *, ids: Iterable[int] = (), states: Iterable[RunState] = (),
                name: str | None = None, kind: str | None = None,
                acts_on: Callable[[Run], bool]) -> list[Run]:
    """The runs a bulk verb acts on, oldest first: those matching every filter given (ids, --state,
    --name glob, --kind) that the verb can act on (`acts_on`). Without filters: the ids alone,
    as typed, each one checked to exist (the verb then says what it cannot do with one)."""
    ids = sorted(set(ids))
    states = list(states)
    with store.read() as s:
        if not (states or name or kind):
            return [must_get(s, rid) for rid in ids]
        q = runs_select(states=states, name=name, kind=kind, oldest_first=True)
        if ids:
            q = q.where(Run.id.in_(ids))
        return [r for r in s.scalars(q) if acts_on(r)]

