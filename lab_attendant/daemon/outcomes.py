"""What the daemon tells the outside world about each run: one start and one end line in the
main log (the journal under systemd), for paging runs too, a notification for a bad end (and
those the run asked for with --notify), and the Prometheus textfile. A paging worker's output still goes only to experimental_paging.log.
"""
from __future__ import annotations

from typing import Any

from lab_attendant.config import Config
from lab_attendant.daemon.notify import Notifications
from lab_attendant.dashboard.metrics import SessionFactory, Textfile
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.states import RunState
from lab_attendant.store.tables import Run

log = get_logger("lab_attendant.runs")

ERROR_ENDS = frozenset({RunState.FAILED, RunState.OOM, RunState.KILLED_THERMAL, RunState.LOST})
WARNING_ENDS = frozenset({RunState.TIMED_OUT})


def run_info(run: Run, state: RunState, reason: str, **extra: Any) -> dict[str, Any]:
    """The run as the notification and the log line carry it."""
    ran_from = run.running_at or run.started_at
    return {"run_id": run.id, "run_kind": run.kind, "run_name": run.name, "run_state": state.value,
            "run_reason": reason, "run_schedule": run.schedule_id,
            "run_needs_paging": int(run.needs_paging), "run_log": run.log_path,
            "run_dir": run.run_dir, "run_attempt": run.attempt,
            "run_started_at": ran_from, **extra}


class Outcomes:
    def __init__(self, cfg: Config, store_read: SessionFactory, host) -> None:
        self.notifications = Notifications(cfg.notify, host)
        self.textfile = Textfile(cfg.metrics, store_read) if cfg.metrics.textfile else None
        self._runs: dict[int, Run] = {}      # the row as claimed, for the end line

    def started(self, run: Run, pid: int | None) -> None:   # None: a Slurm job (no pid here)
        self._runs[run.id] = run
        log.info("run started", run_id=run.id, kind=run.kind, name=run.name, pid=pid,
                 schedule=run.schedule_id, paging=run.needs_paging)
        self.notifications.run_started(run_info(run, RunState.STARTING, "worker started",
                                                run_pid=pid), run.notify)

    def ended(self, run_id: int, state: RunState, reason: str, *, now: float,
              run: Run | None = None, exit_code: int | None = None,
              signal: str | None = None) -> None:
        """The row as claimed at start, or `run` (one that reconcile ended `lost`)."""
        run = self._runs.pop(run_id, None) or run
        if run is None:
            log.warning("run ended", run_id=run_id, state=state.value, reason=reason)
            return
        ran_from = run.running_at or run.started_at
        duration_s = round(now - ran_from, 3) if ran_from else None
        info = run_info(run, state, reason, run_exit_code=exit_code, run_signal=signal,
                        run_duration_s=duration_s)
        level = ("error" if state in ERROR_ENDS else "warning" if state in WARNING_ENDS
                 else "info")
        event = "run requeued" if state is RunState.QUEUED else "run ended"   # daemon stopped
        getattr(log, level)(event, run_id=run.id, kind=run.kind, state=state.value,
                            reason=reason, duration_s=duration_s, exit_code=exit_code,
                            signal=signal)
        self.notifications.run_ended(info, run.notify)
        if self.textfile is not None:
            self.textfile.write()

    def close(self) -> None:
        self.notifications.join()
        if self.textfile is not None:
            self.textfile.write()

    def tick(self, now_mono: float) -> None:
        if self.textfile is not None:
            self.textfile.tick(now_mono)
