"""The `local` executor: spawn, signal and reap worker process groups on this machine; read their
event pipe and output pipe (how a reaped worker ended is lab_attendant.executors.exits').

Stopping is two-step: SIGTERM to the group, SIGKILL after kill_grace_s; a reaped worker's group
is always SIGKILLed once more so that no grandchild outlives its run. The worker starts behind its
write sandbox (lab_attendant.executors.workerfence) and carries its run marker in its env.
Pipes are read at most READ_BUDGET_BYTES per tick each, and lines are capped (jobs.contract.lines).
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
from jobs.contract.lines import LineSplitter
from jobs.contract.protocol import EVENT_FD_ENV, EVENT_FILE_ENV, LineBuffer
from jobs.contract.spec import RunSpec
from lab_attendant import PROJECT_ROOT
from lab_attendant.executors.base import RunHandle
from lab_attendant.executors.workerfence import RUN_MARKER_ENV, WorkerFence, run_marker
from lab_attendant.guards.host import Host
from lab_attendant.store.states import RunState

READ_CHUNK = 65536
READ_BUDGET_BYTES = 4 << 20              # per pipe per tick: a flooding worker cannot hold the loop
MAX_OUTPUT_LINE_BYTES = 1 << 20          # an output line longer than this is dropped


def output_lines(splitter: LineSplitter, data: bytes, *, final: bool) -> list[bytes]:
    """Complete output lines (a dropped one as a line saying so); with `final` the rest too."""
    lines = [ln if isinstance(ln, bytes) else
             f"[lab-attendant: {ln.sentence('an output')}]".encode()
             for ln in splitter.feed(data)]
    if final and splitter.pending_bytes:
        lines.append(splitter.rest())
    return lines


def stage_run(spec: RunSpec) -> tuple[Path, Path]:
    """The run folder with the worker's tmp folder (its TMPDIR, see worker_env) and spec.json in
    it, written atomically: what a worker needs before it starts, wherever it runs."""
    run_dir = Path(spec.run_dir)
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    return run_dir, write_atomic(run_dir / "spec.json", spec.to_json().encode())


@dataclass(kw_only=True)
class LocalRun(RunHandle):
    """A run on this machine: a process group of ours with an event pipe and an output pipe."""
    proc: subprocess.Popen
    events_fd: int                       # read end of the event pipe
    output_fd: int                       # read end of stdout+stderr
    events: LineBuffer = field(default_factory=LineBuffer)
    output: LineSplitter = field(default_factory=lambda: LineSplitter(MAX_OUTPUT_LINE_BYTES))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        return self.proc.pid             # start_new_session: the worker leads its group


def worker_env(event_fd: int | None = None, event_file: Path | None = None,
               run_dir: Path | None = None) -> dict[str, str]:
    """The worker's environment: events go to the pipe `event_fd` or the file `event_file`;
    with `run_dir`, its run marker and its own tmp folder (inside the folder it may write)."""
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
    env.pop(RUN_MARKER_ENV, None)
    if run_dir is not None:
        env[RUN_MARKER_ENV] = run_marker(run_dir)
        for name in ("TMPDIR", "TEMP", "TMP"):
            env[name] = str(Path(run_dir).absolute() / "tmp")
    # Workers never reach a model hub: weights come from local folders only.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class LocalExecutor:
    """The `local` executor (lab_attendant.executors.base.Executor): the worker is a process
    group of ours, watched by the guards; it does not outlive the daemon."""
    is_local = True
    outlives_daemon = False
    fence: WorkerFence | None = None

    def __init__(self, host: Host, *, kill_grace_s: float, fence: WorkerFence | None = None) -> None:
        self.host = host
        self.kill_grace_s = kill_grace_s
        self.fence = fence               # None: workers start unconfined (unit tests' hosts)

    def start(self, spec: RunSpec, *, python: Path, timeout_s: float) -> LocalRun:
        run_dir, spec_path = stage_run(spec)
        prefix = self.fence.launcher(spec, str(python)) if self.fence is not None else []
        ev_r, ev_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            proc = self.host.spawn([*prefix, str(python), "-m", "jobs.worker", str(spec_path)],
                                   cwd=run_dir, env=worker_env(ev_w, run_dir=run_dir),
                                   pass_fds=[ev_w], stdout=out_w)
        except BaseException:
            for fd in (ev_r, ev_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(ev_w)
        os.close(out_w)
        os.set_blocking(ev_r, False)
        os.set_blocking(out_r, False)
        now = self.host.monotonic()
        return LocalRun(executor=self, run_id=spec.run_id, needs_paging=spec.needs_paging,
                        proc=proc, events_fd=ev_r, output_fd=out_r, started_mono=now,
                        deadline_mono=now + timeout_s, oom_kills_at_start=self.host.oom_kill_count())

    def can_reattach(self, run: Any) -> bool:
        return False                     # its event pipe died with the daemon that made it

    def reattach(self, run: Any, offsets: dict[str, int] | None) -> LocalRun:
        raise NotImplementedError("local runs are not re-attached; reconcile ends them `lost`")

    def orphaned(self, run: Any) -> None:
        """Nothing to do: reconcile kills a dead daemon's local process groups."""

    def fds(self, w: LocalRun) -> list[int]:
        return [w.events_fd, w.output_fd]

    @staticmethod
    def _read_all(fd: int, budget_bytes: int = READ_BUDGET_BYTES) -> bytes:
        """What the pipe holds now, up to `budget_bytes` (the rest waits for the next tick)."""
        chunks: list[bytes] = []
        read = 0
        while read < budget_bytes:
            try:
                data = os.read(fd, READ_CHUNK)
            except OSError:  # BlockingIOError: nothing more for now; others: the pipe is gone
                break
            if not data:
                break
            chunks.append(data)
            read += len(data)
        return b"".join(chunks)

    def read_events(self, w: LocalRun) -> list[protocol.Event | protocol.Rejected]:
        return list(w.events.feed(self._read_all(w.events_fd)))

    def read_output(self, w: LocalRun, *, final: bool = False) -> list[bytes]:
        """Complete lines of worker output (and the unterminated rest when `final`)."""
        return output_lines(w.output, self._read_all(w.output_fd), final=final)

    def stop(self, w: LocalRun, state: RunState, reason: str, *, grace_s: float | None = None) -> None:
        """Ask the group to stop (SIGTERM); the first reason given wins."""
        if w.mark_stop(state, reason, grace_s, self.host.monotonic()):
            self.host.killpg(w.pgid, signal.SIGTERM)

    def kill_now(self, w: LocalRun) -> None:
        if w.kill_sent_mono is None:
            w.kill_sent_mono = self.host.monotonic()
        self.host.killpg(w.pgid, signal.SIGKILL)

    def escalate(self, w: LocalRun) -> bool:
        """SIGKILL a group that outlived its grace after SIGTERM; True if it did so now."""
        if w.grace_over(self.kill_grace_s, self.host.monotonic()):
            self.kill_now(w)
            return True
        return False

    def poll(self, w: LocalRun) -> int | None:
        return w.proc.poll()

    def cleanup(self, w: LocalRun) -> None:
        """After reaping: kill leftovers in the group, close our pipe ends."""
        self.host.killpg(w.pgid, signal.SIGKILL)
        for fd in (w.events_fd, w.output_fd):
            try:
                os.close(fd)
            except OSError:
                pass
