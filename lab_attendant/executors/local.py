"""Spawn, signal and reap worker process groups; read their event pipe and output pipe; say how
a reaped worker ended (classify).

Stopping is two-step: SIGTERM to the group, SIGKILL after kill_grace_s; a reaped worker's group
is always SIGKILLed once more so that no grandchild outlives its run.
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.contract import protocol
from jobs.contract.atomic import write_atomic
from jobs.contract.protocol import EVENT_FD_ENV, EVENT_FILE_ENV, LineBuffer
from jobs.contract.spec import RunSpec
from jobs.contract.units import format_size
from lab_attendant import PROJECT_ROOT
from lab_attendant.guards.host import Host, signal_name
from lab_attendant.store.states import RunState

READ_CHUNK = 65536


@dataclass(kw_only=True)
class RunHandle:
    """What the daemon tracks of a worker wherever it runs: its deadline and how it is stopped."""
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
    error: dict[str, Any] | None = None
    oom_kills_at_start: int | None = None  # host.oom_kill_count() when it was spawned
    exit_how: str | None = None          # how it ended when no exit code is known (classify)
    job_id: str | None = None            # the executor's id for it (a Slurm job id)

    @property
    def pid(self) -> int | None:
        return None                      # a worker on another machine has no local pid

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


@dataclass(kw_only=True)
class Worker(RunHandle):
    """A local worker: a process group of ours with an event pipe and an output pipe."""
    proc: subprocess.Popen
    events_fd: int                       # read end of the event pipe
    output_fd: int                       # read end of stdout+stderr
    events: LineBuffer = field(default_factory=LineBuffer)
    output_tail: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid             # start_new_session: the worker leads its group


@dataclass(frozen=True)
class WorkerExit:
    """What is known once a worker is reaped: everything classify() decides from."""
    code: int                              # Popen returncode; -N: ended by signal N
    stop_state: RunState | None = None     # the daemon stopped it, to end in this state
    stop_reason: str = ""
    forced: bool = False                   # SIGKILL after the grace ran out
    result_path: str | None = None         # from the worker's `result` event
    error: dict[str, Any] | None = None    # its `error` event
    near_memory_limit: bool = False        # guards' evidence for a SIGKILL from outside
    rss_bytes: int | None = None           # the worker tree's last RSS reading
    kernel_oom_kills: int = 0              # kernel OOM-killer kills on this host during the run
    how: str | None = None                 # how it ended, where `code` is not known (Slurm)


def classify(x: WorkerExit) -> tuple[RunState, str]:
    """The final state of a reaped worker and the sentence that says why."""
    how = x.how or (f"exited by {signal_name(-x.code)}" if x.code < 0
                    else f"exited with code {x.code}")
    if x.stop_state is not None:
        forced = " (SIGKILL after grace)" if x.forced else ""
        return x.stop_state, f"{x.stop_reason}; worker {how}{forced}"
    err = f"{x.error.get('type')}: {x.error.get('message')}" if x.error else None
    if x.code == protocol.EXIT_OK:
        if x.result_path:
            return RunState.SUCCEEDED, f"result written to {x.result_path}"
        return RunState.FAILED, "worker exited 0 without reporting a result"
    if x.code == protocol.EXIT_OOM:
        return RunState.OOM, f"{_oom_sentence(x.error or {})}{err or 'worker reported OOM'}"
    if x.code == protocol.EXIT_BAD_SPEC:
        return RunState.FAILED, f"worker refused its spec: {err or how}"
    if x.code == -signal.SIGKILL:
        rss = f" at {format_size(x.rss_bytes)} RSS" if x.rss_bytes else ""
        if x.kernel_oom_kills:
            return RunState.OOM, (f"worker {how}{rss}; the kernel OOM killer killed "
                                  f"{x.kernel_oom_kills} process(es) during the run (/proc/vmstat oom_kill)")
        if x.near_memory_limit:
            return RunState.OOM, (f"worker {how}{rss}; likely killed by the kernel OOM killer "
                                  "(memory was near its limit)")
        return RunState.FAILED, f"worker {how}{rss}"
    if x.code < 0:
        return RunState.FAILED, f"worker {how}" + (f" after error {err}" if err else "")
    return RunState.FAILED, f"{err} ({how})" if err else f"worker {how}"

_OOM_KINDS = {"cuda": "GPU memory", "pinned_host": "pinned host memory",
              "cublas": "GPU memory for a cuBLAS/cuDNN workspace", "host": "host memory"}


def _oom_sentence(e: dict[str, Any]) -> str:
    """"out of GPU memory: requested 2.0 GiB with 1.0 GiB free of 10.8 GiB (9.1 GiB reserved by
    torch); " from the worker's error event (jobs/contract/oom.py), as much of it as the worker could read."""
    def size(key: str) -> str:
        return format_size(e[key]) if e.get(key) is not None else "?"
    parts = []
    if e.get("requested_bytes") is not None:
        parts.append(f"requested {size('requested_bytes')}")
    if e.get("free_bytes") is not None:
        parts.append(f"with {size('free_bytes')} free of {size('total_bytes')} "
                     f"({size('reserved_bytes')} reserved by torch)")
    what = _OOM_KINDS.get(e.get("oom_kind"), "memory")
    return f"out of {what}: " + (" ".join(parts) + "; " if parts else "")


def worker_env(event_fd: int | None = None, event_file: Path | None = None) -> dict[str, str]:
    """The worker's environment: events go to the pipe `event_fd` or the file `event_file`."""
    env = dict(os.environ)
    # The worker imports `jobs` from this checkout whatever venv its python comes from; of the
    # caller's entries only absolute ones (an empty one means the cwd, i.e. the run folder).
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *extra])
    env["PYTHONSAFEPATH"] = "1"   # `-m` would put the cwd (the run folder) first on sys.path
    env.pop(EVENT_FD_ENV, None)
    env.pop(EVENT_FILE_ENV, None)
    if event_fd is not None:
        env[EVENT_FD_ENV] = str(event_fd)
    if event_file is not None:
        env[EVENT_FILE_ENV] = str(event_file)
    env["PYTHONUNBUFFERED"] = "1"
    # Workers never reach a model hub: weights come from local folders only.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class Launcher:
    def __init__(self, host: Host, *, kill_grace_s: float) -> None:
        self.host = host
        self.kill_grace_s = kill_grace_s

    def spawn(self, spec: RunSpec, *, python: Path, timeout_s: float) -> Worker:
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / "spec.json"
        write_atomic(spec_path, spec.to_json().encode())
        ev_r, ev_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            proc = self.host.spawn([str(python), "-m", "jobs.worker", str(spec_path)],
                                   cwd=run_dir, env=worker_env(ev_w), pass_fds=[ev_w],
                                   stdout=out_w)
        except BaseException:
            for fd in (ev_r, ev_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(ev_w)
        os.close(out_w)
        os.set_blocking(ev_r, False)
        os.set_blocking(out_r, False)
        now = self.host.monotonic()
        return Worker(run_id=spec.run_id, needs_paging=spec.needs_paging, proc=proc, events_fd=ev_r,
                      output_fd=out_r, started_mono=now, deadline_mono=now + timeout_s,
                      oom_kills_at_start=self.host.oom_kill_count())

    @staticmethod
    def _read_all(fd: int) -> bytes:
        chunks = []
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except OSError:  # BlockingIOError: nothing more for now; others: the pipe is gone
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def read_events(self, w: Worker) -> list[dict[str, Any]]:
        return list(w.events.feed(self._read_all(w.events_fd)))

    def read_output(self, w: Worker, *, final: bool = False) -> list[bytes]:
        """Complete lines of worker output (and the unterminated rest when `final`)."""
        data = w.output_tail + self._read_all(w.output_fd)
        *lines, w.output_tail = data.split(b"\n")
        if final and w.output_tail:
            lines.append(w.output_tail)
            w.output_tail = b""
        return lines

    def stop(self, w: Worker, state: RunState, reason: str, *, grace_s: float | None = None) -> None:
        """Ask the group to stop (SIGTERM); the first reason given wins."""
        if w.mark_stop(state, reason, grace_s, self.host.monotonic()):
            self.host.killpg(w.pgid, signal.SIGTERM)

    def kill_now(self, w: Worker) -> None:
        if w.kill_sent_mono is None:
            w.kill_sent_mono = self.host.monotonic()
        self.host.killpg(w.pgid, signal.SIGKILL)

    def escalate(self, w: Worker) -> bool:
        """SIGKILL a group that outlived its grace after SIGTERM; True if it did so now."""
        if w.grace_over(self.kill_grace_s, self.host.monotonic()):
            self.kill_now(w)
            return True
        return False

    def poll(self, w: Worker) -> int | None:
        return w.proc.poll()

    def cleanup(self, w: Worker) -> None:
        """After reaping: kill leftovers in the group, close our pipe ends."""
        self.host.killpg(w.pgid, signal.SIGKILL)
        for fd in (w.events_fd, w.output_fd):
            try:
                os.close(fd)
            except OSError:
                pass
