"""What a worker may touch and how it is told apart from other processes: the folders its Landlock
sandbox (jobs.contract.sandbox) leaves writable, and the environment marker reconcile checks.

Everything else under state_dir (the store, backups, other runs' folders, other kinds' worker
state) is read-only to a worker. Where the kernel cannot confine, the daemon says once which protection is missing
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
# What workers kept before each kind had its own folder (first in state_dir itself, then in one worker
# folder shared by every kind), relative to state_dir -> where it lives now, relative to the worker folder.
LEGACY_WORKER_STATE = (("insights", "nightly_insights/insights"),
                       ("worker/insights", "nightly_insights/insights"),
                       ("generate", "generate"),
                       ("read_bandwidth.json", "probe/read_bandwidth.json"),
                       ("worker/read_bandwidth.json", "probe/read_bandwidth.json"))
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
    shared_writable: tuple[Path, ...]    # besides its run folder and its kind's state: the same for every worker
    state_dir: Path = Path("/nonexistent")  # never writable by a worker, whatever a run asks
    worker_state: Path = Path("/nonexistent")  # a folder per kind in it: the run's own kind's is writable

    @classmethod
    def for_config(cls, cfg: Any) -> WorkerFence:
        state = cfg.paths.state_dir.absolute()
        shared = [*user_caches(), *(p.absolute() for p in cfg.worker.writable_paths)]
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
                   shared_writable=tuple(kept), state_dir=state, worker_state=cfg.worker_state_dir.absolute())

    def writable(self, run_dir: Path, extra: tuple[Path, ...] = ()) -> list[Path]:
        return [Path(run_dir).absolute(), *self.shared_writable, *extra]

    def run_writable(self, spec: Any) -> tuple[Path, ...]:
        """What one run may write besides the shared set: its kind's state folder (spec.state_dir, made by
        the daemon from the kind's name) and a `command` run's own working folder (its `cwd` param,
        confined to the allowed roots at submit), unless that holds the state folder."""
        own = (Path(spec.state_dir).absolute(),)
        cwd = spec.params.get("cwd") if spec.kind == "command" else None
        if not cwd:
            return own
        path = Path(cwd).absolute()
        if self.state_dir.is_relative_to(path):
            log.warning("a command's cwd holds the state folder: not writable by it", path=str(path))
            return own
        return (*own, path)

    def prepare(self, kind_state: Path | None = None) -> None:
        """Create what a rule needs to exist (Landlock rules hold open folders): the caches, the shared
        writable paths and the run's kind state folder (0700; one that cannot be made is skipped)."""
        for path in (*self.shared_writable, *([kind_state] if kind_state else [])):
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
        self.prepare(Path(spec.state_dir))
        return self.prefix(python, Path(spec.run_dir), remote=remote, extra=self.run_writable(spec))

    def describe(self) -> dict[str, Any]:
        """What `status` shows (stored in meta SANDBOX_META at daemon start)."""
        return {"enabled": self.enabled, "landlock_abi": self.abi, "missing": self.missing or None,
                "writable": ["<run folder>", f"<its kind's folder in {self.worker_state}>",
                             *map(str, self.shared_writable)]}


def move_legacy_worker_state(state_dir: Path, worker_state_dir: Path) -> list[str]:
    """Move what workers kept in state_dir itself, or in the worker folder every kind shared, into its
    kind's folder (once); returns the old names moved (relative to state_dir). One whose new place is
    taken is left where it is."""
    moved = []
    for old_name, new_name in LEGACY_WORKER_STATE:
        old, new = state_dir / old_name, worker_state_dir / new_name
        if old.exists() and not new.exists():
            for folder in reversed(new.relative_to(state_dir).parents[:-1]):   # worker/, worker/KIND/
                (state_dir / folder).mkdir(mode=0o700, exist_ok=True)
            os.replace(old, new)
            moved.append(old_name)
    return moved
