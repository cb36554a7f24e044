"""Run states and the allowed transitions between them (stdlib only).

Everything that changes a run's state goes through store.transition(), which checks this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RunState(str, Enum):
    QUEUED = "queued"
    HELD = "held"                      # waiting: paging flag off, thermal cooldown, co-tenant busy
    STARTING = "starting"              # worker spawned, no `started` event yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    KILLED_THERMAL = "killed_thermal"
    OOM = "oom"
    LOST = "lost"                      # its daemon died; found on reconcile
    SKIPPED = "skipped"                # a schedule fired while its kind could not run

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({
    RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT,
    RunState.KILLED_THERMAL, RunState.OOM, RunState.LOST, RunState.SKIPPED,
})
ACTIVE = frozenset({RunState.STARTING, RunState.RUNNING})
WAITING = frozenset({RunState.QUEUED, RunState.HELD})

_ENDINGS = {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT,
            RunState.KILLED_THERMAL, RunState.OOM, RunState.LOST}

ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.STARTING, RunState.HELD, RunState.CANCELLED,
                                RunState.SKIPPED}),
    RunState.HELD: frozenset({RunState.QUEUED, RunState.CANCELLED, RunState.SKIPPED}),
    # A worker can end before its `started` event is read, so STARTING may end directly.
    # Back to QUEUED: requeued when the daemon stopped before the run could finish.
    RunState.STARTING: frozenset(_ENDINGS | {RunState.RUNNING, RunState.QUEUED}),
    RunState.RUNNING: frozenset(_ENDINGS | {RunState.QUEUED}),
    **{s: frozenset() for s in TERMINAL},
}


def can_transition(src: RunState, dst: RunState) -> bool:
    return dst in ALLOWED[src]


@dataclass(frozen=True)
class Hold:
    """Why paging runs wait: `code` is what the daemon compares (held runs keep it in
    runs.hold_code); `reason` is the sentence people read."""
    code: str                          # "paging_off", "thermal", "cotenant:NAME", ...
    reason: str
