"""What the daemon does with each event a worker reports (jobs.contract.protocol, decoded and
checked there): one handler that turns them into store writes and feeds the run sampler."""
from __future__ import annotations

from jobs.contract import protocol
from lab_attendant.executors.base import RunHandle
from lab_attendant.service.logsetup import get_logger, log_for
from lab_attendant.store.db import Store
from lab_attendant.store.faults import WriteBehind
from lab_attendant.store.samples import Sampler
from lab_attendant.store.states import RunState

log = get_logger("lab_attendant.daemon.events")
RECORDED_REJECTIONS = 5                  # per run, as run events; later ones are only logged


class WorkerEvents:
    """`writes` is the daemon's WriteBehind: `must` writes are retried until they land, `may`
    ones (progress, heartbeats) are dropped while the store refuses writes. A run's result path
    and error are also kept on its handle, for classify()."""

    def __init__(self, store: Store, writes: WriteBehind, sampler: Sampler) -> None:
        self.store, self.writes, self.sampler = store, writes, sampler

    def handle(self, w: RunHandle, ev: protocol.Event | protocol.Rejected, now: float) -> None:
        rid, store, writes = w.run_id, self.store, self.writes
        rlog = log_for(w.needs_paging, "lab_attendant.daemon.loop").bind(run_id=rid)
        if isinstance(ev, protocol.Rejected):      # logged, never fatal: the run goes on
            rlog.warning("worker event rejected", reason=ev.reason,
                         line=ev.line.decode("utf-8", "replace"))
            w.rejected_events += 1
            if w.rejected_events <= RECORDED_REJECTIONS:
                more = ("; further rejected events are only logged"
                        if w.rejected_events == RECORDED_REJECTIONS else "")
                writes.may(store.add_event, rid, "warning", f"worker event rejected: {ev.reason}{more}")
        elif isinstance(ev, protocol.Started):
            writes.must(store.transition, rid, RunState.RUNNING, f"{w.where} started",
                        expect={RunState.STARTING}, running_at=ev.t)
            rlog.info("run running", pid=w.pid)
        elif isinstance(ev, protocol.Progress):
            self.sampler.progress(rid, ev.done, ev.total)
            writes.may(store.update_run, rid, progress_done=ev.done, progress_total=ev.total,
                       progress_unit=ev.unit, progress_phase=ev.phase, heartbeat_at=now)
        elif isinstance(ev, protocol.Metric):
            self.sampler.metrics(rid, ev.metrics)
            code = ev.metrics.get("exit_code")
            if isinstance(code, int) and not isinstance(code, bool):   # the command kind's program
                w.program_exit = code
            writes.may(store.merge_metrics, rid, ev.metrics)
        elif isinstance(ev, protocol.Heartbeat):
            writes.may(store.update_run, rid, heartbeat_at=now)
        elif isinstance(ev, protocol.Result):
            w.result_path = ev.path
            writes.must(store.update_run, rid, result_path=ev.path)
            writes.must(store.add_event, rid, "result", ev.path)
        elif isinstance(ev, protocol.WorkerWarning):
            writes.must(store.add_event, rid, "warning", ev.message)
            rlog.warning("worker warning", message=ev.message)
        elif isinstance(ev, protocol.WorkerError):
            w.error = ev
            writes.must(store.add_event, rid, "error", f"{ev.type}: {ev.message}")
            rlog.warning("worker reported an error", type=ev.type, message=ev.message)
