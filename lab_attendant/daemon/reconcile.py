"""Start-up reconciliation: runs a dead daemon left active end `lost`, and any live process group
of theirs is killed (local runs are not adopted: their event pipes died with the old daemon;
Slurm runs are, by the daemon, since their events are in a file).

A row's pid is only a claim (a worker without a sandbox could write it): a process is killed only
if its start time matches the row's and its environment carries the marker the daemon gave that
run's worker (lab_attendant.executors.workerfence.RUN_MARKER_ENV).
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

from lab_attendant.executors.workerfence import RUN_MARKER_ENV, run_marker
from lab_attendant.guards.host import Host
from lab_attendant.service.logsetup import log_for
from lab_attendant.store.db import Store
from lab_attendant.store.states import ACTIVE, RunState
from lab_attendant.store.tables import Run


def reconcile(store: Store, host: Host, kill_grace_s: float, runs_dir: Path,
              feed: Callable[[], None] = lambda: None,
              keep: Callable[[Run], bool] = lambda run: False) -> list[Run]:
    """All groups get SIGTERM at once and share one kill_grace_s, so start-up waits one grace,
    not one per run; `feed` (the systemd watchdog) is called while it waits. Runs `keep` says
    the caller re-attaches (Slurm jobs) are left alone. Returns the runs it ended `lost`.
    `runs_dir`: where the daemon puts run folders (the markers come from it, not the row)."""
    runs = [r for r in store.list_runs(states=ACTIVE) if not keep(r)]

    def ours(pid: int, run: Run) -> bool:
        return host.env_value(pid, RUN_MARKER_ENV) == run_marker(runs_dir / str(run.id))

    live = {r.id: r.pid for r in runs if r.pid and host.is_same_process(r.pid, r.pid_create_time)
            and ours(r.pid, r)}
    kill_groups(host, list(live.values()), kill_grace_s, feed)
    lost = []
    for run in runs:
        if run.id in live:
            reason = (f"daemon restarted: worker group {run.pid} of a previous daemon was "
                      "still running and was killed (runs are not adopted)")
        else:
            if run.pid:
                # The leader is gone (or a zombie, whose environment cannot be read): what is
                # left in its group and carries the run's marker is our orphan (a grandchild);
                # anything else is not ours to kill.
                members = host.group_pids(run.pid)
                mine = [pid for pid in members if ours(pid, run)]
                for pid in mine:
                    host.kill(pid, signal.SIGKILL)
                if len(mine) < len(members):
                    log_for(run.needs_paging, "lab_attendant.daemon.loop").bind(
                        run_id=run.id).warning(
                        "left alone: processes in the group the run's row names whose start "
                        "time or run marker is not its worker's",
                        pids=[p for p in members if p not in mine])
            reason = "daemon restarted: the worker of a previous daemon was gone"
        ended = store.transition(run.id, RunState.LOST, reason)
        if ended is not None:          # (None: the run is no longer there to end)
            lost.append(ended)
        log_for(run.needs_paging, "lab_attendant.daemon.loop").bind(run_id=run.id).warning(
            "reconciled run", state="lost", reason=reason)
        feed()
    return lost


def kill_groups(host: Host, pgids: list[int], grace_s: float,
                feed: Callable[[], None] = lambda: None) -> None:
    for pgid in pgids:
        host.killpg(pgid, signal.SIGTERM)
    deadline = host.monotonic() + grace_s
    while any(host.group_alive(p) for p in pgids) and host.monotonic() < deadline:
        feed()
        host.sleep(0.05)
    for pgid in pgids:
        host.killpg(pgid, signal.SIGKILL)
