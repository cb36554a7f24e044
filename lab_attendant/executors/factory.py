"""Which executor runs a run: `local` (LocalExecutor, a process group on this machine, events over
a pipe) or `slurm` (SlurmExecutor, a batch job, events over the shared run folder). This is the
one place that reads a run's executor name; everything else asks the run's handle
(RunHandle.executor, lab_attendant.executors.base.Executor).

Guards and co-tenants are local concerns: only local runs have a process tree for them to watch.
Slurm runs outlive the daemon: a stopping daemon detaches from them and the next start re-attaches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jobs.contract.spec import RunSpec
from lab_attendant.config import Config
from lab_attendant.executors.base import Executor, RunHandle
from lab_attendant.executors.local import LocalExecutor
from lab_attendant.executors.slurm import SlurmExecutor
from lab_attendant.guards.host import Host
from lab_attendant.service.logsetup import log_for

OFFSETS_META = "slurm_offsets:{run_id}"   # meta key: where a re-attached run's tails resume


class ExecutorFactory:
    def __init__(self, cfg: Config, host: Host, local: LocalExecutor, *,
                 save_meta: Callable[[str, Any], None]) -> None:
        """`save_meta(key, value)` records a meta value the daemon may lose (Slurm's offsets)."""
        self.cfg = cfg
        self.local = local
        self.slurm = SlurmExecutor(
            cfg.executor.slurm, host, state_dir=cfg.paths.state_dir,
            kill_grace_s=cfg.limits.kill_grace_s,
            save_offsets=lambda rid, offs: save_meta(OFFSETS_META.format(run_id=rid), offs),
            fence=local.fence)

    def of(self, executor: str) -> Executor[Any]:
        """The executor a run's `executor` column names."""
        return self.slurm if executor == "slurm" else self.local

    def python_for(self, executor: str) -> Path:
        """The worker interpreter's path as the machine that runs it sees it."""
        if executor == "slurm" and self.cfg.executor.slurm.python is not None:
            return self.cfg.executor.slurm.python
        return Path(self.cfg.worker.python)

    def start(self, spec: RunSpec, *, python: Path, timeout_s: float,
              executor: str = "local") -> RunHandle:
        return self.of(executor).start(spec, python=python, timeout_s=timeout_s)

    def reattachable(self, run: Any) -> bool:
        return self.of(run.executor).can_reattach(run)

    def reattach(self, run: Any, get_meta: Callable[[str], Any]) -> RunHandle:
        """Follow a previous daemon's run again, from the offsets it saved."""
        w = self.of(run.executor).reattach(run, get_meta(OFFSETS_META.format(run_id=run.id)))
        log_for(run.needs_paging, "lab_attendant.daemon.loop").info(
            "re-attached run", run_id=run.id, job_id=run.executor_job_id)
        return w

    def forget_unrecorded(self, runs: list[Any]) -> list[Any]:
        """Active runs a dead daemon left: each executor stops what the store does not know of
        (a Slurm job whose id never reached the store). Returns `runs`."""
        for run in runs:
            self.of(run.executor).orphaned(run)
        return runs
