"""The executor seam: what the daemon asks of wherever a run's worker runs (Executor: start,
poll, signal, re-attach, is_local), and the one handle type (RunHandle) it keeps per run.

Implementations: lab_attendant.executors.local (a process group on this machine) and
lab_attendant.executors.slurm (a batch job); lab_attendant.executors.factory picks one per run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from jobs.contract import protocol
from jobs.contract.spec import RunSpec
from lab_attendant.store.states import RunState

# The handle type an executor takes back (its own subclass of RunHandle).
H = TypeVar("H", bound="RunHandle", contravariant=True)


class Executor(Protocol[H]):
    is_local: bool               # runs on this machine (a pid the guards can watch)
    outlives_daemon: bool        # goes on when the daemon stops; the next start re-attaches it

    def start(self, spec: RunSpec, *, python: Path, timeout_s: float) -> RunHandle:
        """Start the worker (`python -m jobs.worker SPEC`); OSError when it cannot."""

    def can_reattach(self, run: Any) -> bool:
        """Whether an active run a previous daemon started can be followed again."""

    def reattach(self, run: Any, offsets: dict[str, int] | None) -> RunHandle:
        """Follow a previous daemon's run again, from the read offsets it saved."""

    def orphaned(self, run: Any) -> None:
        """At start-up, for an active run a dead daemon left: stop what it may have started
        that the store does not know of (a Slurm job whose id was never recorded)."""

    def fds(self, w: H) -> list[int]:
        """What the daemon's select() waits on for this run (none: polled by the tick)."""

    def read_events(self, w: H) -> list[protocol.Event | protocol.Rejected]:
        """Events the worker reported since the last call, decoded by jobs.contract.protocol."""

    def read_output(self, w: H, *, final: bool = False) -> list[bytes]:
        """Complete lines of its output (and the unterminated rest when `final`)."""

    def poll(self, w: H) -> int | None:
        """None while it runs; else a Popen-style return code for classify()."""

    def stop(self, w: H, state: RunState, reason: str, *,
             grace_s: float | None = None) -> None:
        """Ask it to stop (SIGTERM or its equivalent); the first reason given wins."""

    def kill_now(self, w: H) -> None:
        """SIGKILL (or its equivalent) now."""

    def escalate(self, w: H) -> bool:
        """SIGKILL a run that outlived its grace after SIGTERM; True if it did so now."""

    def cleanup(self, w: H) -> None:
        """After it ended, or when the daemon detaches from it: release what we hold of it."""


@dataclass(kw_only=True)
class RunHandle:
    """What the daemon tracks of a run's worker wherever it runs (the one type in its table):
    the executor that runs it, its deadline and how it is stopped."""
    executor: Executor[Any] = field(repr=False, compare=False)
    run_id: int
    needs_paging: bool
    started_mono: float
    deadline_mono: float
    stop_state: RunState | None = None   # why we are stopping it, decided before the signal
    stop_reason: str = ""
    kill_grace_s: float | None = None    # this stop's grace; None: the launcher's default
    term_sent_mono: float | None = None
    kill_sent_mono: float | None = None
    result_path: str | None = None
    error: protocol.WorkerError | None = None
    oom_kills_at_start: int | None = None  # host.oom_kill_count() when it was spawned
    exit_how: str | None = None          # how it ended when no exit code is known (classify)
    job_id: str | None = None            # the executor's id for it (a Slurm job id)
    requested: str = ""                  # what it asked the executor for, in words (`show`)
    rejected_events: int = 0             # event lines refused at decode (the first few recorded)
    program_exit: int | None = None      # a command run's own program's exit code (its exit_code metric)

    @property
    def pid(self) -> int | None:
        return None                      # a worker on another machine has no local pid

    @property
    def is_local(self) -> bool:
        """On this machine: the guards, co-tenants and GPU samples watch its process tree."""
        return self.executor.is_local

    @property
    def where(self) -> str:
        return f"worker pid {self.pid}"

    def mark_stop(self, state: RunState, reason: str, grace_s: float | None, now: float) -> bool:
        """Record why it is being stopped (the first reason wins); True if no SIGTERM (or its
        equivalent) was sent yet, i.e. the caller sends it now."""
        if self.stop_state is None:
            self.stop_state, self.stop_reason, self.kill_grace_s = state, reason, grace_s
        if self.term_sent_mono is None:
            self.term_sent_mono = now
            return True
        return False

    def grace_over(self, default_grace_s: float, now: float) -> bool:
        """SIGTERM went out longer than its grace ago and no SIGKILL yet."""
        grace = default_grace_s if self.kill_grace_s is None else self.kill_grace_s
        return (self.term_sent_mono is not None and self.kill_sent_mono is None
                and now - self.term_sent_mono >= grace)
