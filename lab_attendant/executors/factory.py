"""Where a run's worker runs: the seam the daemon calls. `local` is the Launcher (a process group
on this machine, events over a pipe); `slurm` is a batch job (events over the shared run folder).

The daemon holds one Executors and calls spawn / read_events / read_output / poll / stop /
kill_now / escalate / cleanup on it for every worker; each call goes to the worker's executor.
Guards and co-tenants are local concerns: only local workers have a pid for them to watch. Slurm
runs outlive the daemon: a stopping daemon detaches from them and the next start re-attaches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jobs.contract.spec import RunSpec
from lab_attendant.config import Config
from lab_attendant.executors.local import Launcher, RunHandle, Worker
from lab_attendant.executors.slurm import SlurmExecutor, SlurmWorker
from lab_attendant.guards.host import Host
from lab_attendant.service.logsetup import log_for
from lab_attendant.store.states import RunState

OFFSETS_META = "slurm_offsets:{run_id}"   # meta key: where a re-attached run's tails resume


class Executors:
    def __init__(self, cfg: Config, host: Host, local: Launcher, *,
                 may_write: Callable[..., None]) -> None:
        self.cfg = cfg
        self.local = local
        self.slurm = SlurmExecutor(
            cfg.executor.slurm, host, state_dir=cfg.paths.state_dir,
            kill_grace_s=cfg.limits.kill_grace_s,
            save_offsets=lambda rid, offs: may_write(
                "set_meta", OFFSETS_META.format(run_id=rid), offs))

    def _of(self, w: RunHandle) -> Any:
        return self.slurm if isinstance(w, SlurmWorker) else self.local

    def python_for(self, executor: str) -> Path:
        """The worker interpreter's path as the machine that runs it sees it."""
        if executor == "slurm" and self.cfg.executor.slurm.python is not None:
            return self.cfg.executor.slurm.python
        return Path(self.cfg.worker.python)

    def spawn(self, spec: RunSpec, *, python: Path, timeout_s: float,
              executor: str = "local") -> RunHandle:
        if executor == "slurm":
            return self.slurm.spawn(spec, python=python, timeout_s=timeout_s)
        return self.local.spawn(spec, python=python, timeout_s=timeout_s)

    @staticmethod
    def fds(w: RunHandle) -> list[int]:
        """What the daemon's select() waits on for this worker (nothing: polled by the tick)."""
        return [w.events_fd, w.output_fd] if isinstance(w, Worker) else []

    @staticmethod
    def outlives_daemon(w: RunHandle) -> bool:
        return isinstance(w, SlurmWorker)

    def reattachable(self, run: Any) -> bool:
        return run.executor == "slurm" and bool(run.executor_job_id) and bool(run.run_dir)

    def attach(self, run: Any, get_meta: Callable[[str], Any]) -> RunHandle:
        """Follow a previous daemon's Slurm run again, from the offsets it saved."""
        w = self.slurm.attach(run, get_meta(OFFSETS_META.format(run_id=run.id)))
        log_for(run.needs_paging, "lab_attendant.daemon.loop").info(
            "re-attached run", run_id=run.id, job_id=run.executor_job_id)
        return w

    def forget_unrecorded(self, runs: list[Any]) -> list[Any]:
        """Slurm runs whose job id never reached the store (the daemon died right after sbatch):
        cancel their job, if any, by name. Returns `runs`."""
        for run in runs:
            if run.executor == "slurm" and not run.executor_job_id:
                self.slurm.cancel_by_name(run.id)
        return runs

    def read_events(self, w: RunHandle) -> list[dict[str, Any]]:
        return self._of(w).read_events(w)

    def read_output(self, w: RunHandle, *, final: bool = False) -> list[bytes]:
        return self._of(w).read_output(w, final=final)

    def poll(self, w: RunHandle) -> int | None:
        return self._of(w).poll(w)

    def stop(self, w: RunHandle, state: RunState, reason: str, *,
             grace_s: float | None = None) -> None:
        self._of(w).stop(w, state, reason, grace_s=grace_s)

    def kill_now(self, w: RunHandle) -> None:
        self._of(w).kill_now(w)

    def escalate(self, w: RunHandle) -> bool:
        return self._of(w).escalate(w)

    def cleanup(self, w: RunHandle) -> None:
        self._of(w).cleanup(w)
