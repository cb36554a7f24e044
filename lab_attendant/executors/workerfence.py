"""What a worker may touch and how it is told apart from other processes: the folders its Landlock
sandbox (jobs.contract.sandbox) leaves writable, and the environment marker reconcile checks.

Everything else under state_dir (the store, backups, other runs' folders) is read-only to a
worker. Where the kernel cannot confine, the daemon says once which protection is missing
(log line and `status`) and runs workers unconfined.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contract.sandbox import landlock_abi, launcher_argv
from lab_attendant.service.logsetup import get_logger

RUN_MARKER_ENV = "LAB_ATTENDANT_RUN"     # set in each worker's env: its run folder's path
SANDBOX_META = "worker_sandbox"          # meta key: what the daemon found at start, for `status`
# What workers kept directly in state_dir before it became read-only to them.
LEGACY_WORKER_STATE = ("insights", "generate", "read_bandwidth.json")
log = get_logger("lab_attendant.executors.workerfence")


def run_marker(run_dir: Path | str) -> str:
    """The marker value of a run's worker: its run folder, absolute (unique per lab and run)."""
    return str(Path(run_dir).absolute())


CACHE_ENVS = ("XDG_CACHE_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH", "TORCHINDUCTOR_CACHE_DIR",
              "HF_HOME")                 # the unit points the first four at its CacheDirectory


def user_caches() -> list[Path]:
    """Where torch, Triton, CUDA and Hugging Face keep compiled kernels and caches: the folders
    the environment names, else their defaults under $HOME."""
    home = Path.home()
    named = [Path(os.environ[name]) for name in CACHE_ENVS if os.environ.get(name)]
    defaults = [home / ".cache", home / ".triton", home / ".nv"]
    return [*named, *(d for d in defaults if d not in named)]


@dataclass(frozen=True)
class WorkerFence:
    configured: bool                     # [worker] sandbox
    enabled: bool                        # local workers start through the Landlock launcher
    abi: int                             # Landlock ABI of this kernel (0: none)
    missing: str                         # "" or the sentence naming the protection missing
    shared_writable: tuple[Path, ...]    # besides its run folder: the same for every worker
    state_dir: Path = Path("/nonexistent")  # never writable by a worker, whatever a run asks

    @classmethod
    def for_config(cls, cfg: Any) -> WorkerFence:
        state = cfg.paths.state_dir.absolute()
        shared = [cfg.worker_state_dir.absolute(), *user_caches(),
                  *(p.absolute() for p in cfg.worker.writable_paths)]
        # Landlock cannot take back a folder below a writable one: a path holding the state
        # folder would give a worker the store.
        kept = [p for p in shared if not state.is_relative_to(p)]
        for dropped in (p for p in shared if p not in kept):
            log.warning("not writable by workers: it holds the state folder", path=str(dropped),
                        state_dir=str(state))
        abi, why = landlock_abi()
        if not cfg.worker.sandbox:
            missing = ("[worker] sandbox = false: workers can write the store, backups and "
                       "other runs' folders")
        elif abi == 0:
            missing = (f"{why}: workers can write the store, backups and other runs' folders; "
                       "kills still check the process's start time and run marker")
        else:
            missing = ""
        return cls(configured=cfg.worker.sandbox, enabled=bool(cfg.worker.sandbox and abi), abi=abi, missing=missing,
                   shared_writable=tuple(kept), state_dir=state)

    def writable(self, run_dir: Path, extra: tuple[Path, ...] = ()) -> list[Path]:
        return [Path(run_dir).absolute(), *self.shared_writable, *extra]

    def run_writable(self, spec: Any) -> tuple[Path, ...]:
        """What one run may write besides the shared set: a `command` run's own working folder (its
        `cwd` param, confined to the allowed roots at submit), unless it holds the state folder."""
        cwd = spec.params.get("cwd") if spec.kind == "command" else None
        if not cwd:
            return ()
        path = Path(cwd).absolute()
        if self.state_dir.is_relative_to(path):
            log.warning("a command's cwd holds the state folder: not writable by it", path=str(path))
            return ()
        return (path,)

    def prepare(self) -> None:
        """Create what a rule needs to exist (Landlock rules hold open folders): the shared
        state folder and the caches (0700; one that cannot be made is skipped)."""
        for path in self.shared_writable:
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError:
                pass

    def prefix(self, python: str, run_dir: Path, *, remote: bool = False,
               extra: tuple[Path, ...] = ()) -> list[str]:
        """argv to put in front of `python -m jobs.worker SPEC` (none when off). A `remote`
        worker (a Slurm node, whose kernel this daemon cannot probe) is confined where its
        kernel can, and says so on its output where it cannot."""
        if not self.configured or not (self.enabled or remote):
            return []
        return launcher_argv(python, self.writable(run_dir, extra), required=not remote)

    def launcher(self, spec: Any, python: str, *, remote: bool = False) -> list[str]:
        """prefix() for this run (its own writable folders included), after prepare(): what both
        executors put in front of the worker's argv."""
        self.prepare()
        return self.prefix(python, Path(spec.run_dir), remote=remote, extra=self.run_writable(spec))

    def describe(self) -> dict[str, Any]:
        """What `status` shows (stored in meta SANDBOX_META at daemon start)."""
        return {"enabled": self.enabled, "landlock_abi": self.abi, "missing": self.missing or None,
                "writable": ["<run folder>", *map(str, self.shared_writable)]}


def move_legacy_worker_state(state_dir: Path, worker_state_dir: Path) -> list[str]:
    """Move what workers kept in state_dir itself into worker_state_dir (once); returns the
    names moved. A name already present in both is left where it is."""
    moved = []
    for name in LEGACY_WORKER_STATE:
        old, new = state_dir / name, worker_state_dir / name
        if old.exists() and not new.exists():
            worker_state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(old, new)
            moved.append(name)
    return moved
