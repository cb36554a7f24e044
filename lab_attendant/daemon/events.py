"""What the daemon records for each event a worker reports (jobs.contract.protocol): one place that turns
`started`, `progress`, `metric`, `heartbeat`, `result`, `warning` and `error` into store writes."""
from __future__ import annotations

from typing import Any

from jobs.contract import protocol
from lab_attendant.service.logsetup import log_for
from lab_attendant.store.states import RunState


def apply_event(writes: Any, w: Any, ev: dict[str, Any], now: float) -> None:
    """`writes` is the daemon's storefaults.WriteBehind: `must` writes are retried until they land,
    `may` ones (progress, heartbeats) are dropped while the store refuses writes. `w` is the run's
    handle (launcher.RunHandle); its result path and error are kept there for classify()."""
    name, rid = ev["event"], w.run_id
    rlog = log_for(w.needs_paging, "lab_attendant.daemon.loop").bind(run_id=rid)
    if name == protocol.STARTED:
        writes.must("transition", rid, RunState.RUNNING, f"{w.where} started",
                    expect={RunState.STARTING}, running_at=ev.get("t"))
        rlog.info("run running", pid=w.pid)
    elif name == protocol.PROGRESS:
        writes.may("update_run", rid, progress_done=ev.get("done"), progress_total=ev.get("total"),
                   progress_unit=ev.get("unit"), heartbeat_at=now)
    elif name == protocol.METRIC:
        writes.may("merge_metrics", rid, ev.get("metrics", {}))
    elif name == protocol.HEARTBEAT:
        writes.may("update_run", rid, heartbeat_at=now)
    elif name == protocol.RESULT:
        w.result_path = ev.get("path")
        writes.must("update_run", rid, result_path=w.result_path)
        writes.must("add_event", rid, "result", str(w.result_path))
    elif name == protocol.WARNING:
        writes.must("add_event", rid, "warning", str(ev.get("message")))
        rlog.warning("worker warning", message=ev.get("message"))
    elif name == protocol.ERROR:
        w.error = ev
        writes.must("add_event", rid, "error", f"{ev.get('type')}: {ev.get('message')}")
        rlog.warning("worker reported an error", type=ev.get("type"), message=ev.get("message"))
