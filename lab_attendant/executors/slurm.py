"""The `slurm` executor: the same worker (`python -m jobs.worker SPEC`) as a Slurm batch job.

Submitted with `sbatch --parsable`, watched with one `squeue` call per poll interval for all runs
(and `scontrol show job` once per ended job, for its exit code), stopped with `scancel`. Events
and output travel through files in the run folder on the shared filesystem. Slurm's states map
to ours in `map_state` (a pure function); the final state comes from Slurm plus the worker's
result. The Slurm CLI finds its cluster through $SLURM_CONF, as usual.
"""
from __future__ import annotations

import hashlib
import math
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from jobs.contract import protocol
from jobs.contract.atomic import write_atomic
from jobs.contract.spec import RunSpec
from lab_attendant.config import SlurmConfig
from lab_attendant.errors import UserError
from lab_attendant.executors.base import RunHandle
from lab_attendant.executors.eventfile import FileTail, read_events
from lab_attendant.executors.local import MAX_OUTPUT_LINE_BYTES, stage_run, worker_env
from lab_attendant.executors.workerfence import WorkerFence
from lab_attendant.guards.host import Host
from lab_attendant.plan import host_request
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.states import RunState

EVENTS_FILE = "events.jsonl"
OUTPUT_FILE = "slurm-output.log"
SCRIPT_FILE = "worker.sbatch"
COMMAND_TIMEOUT_S = 30.0
OFFSETS_EVERY_S = 5.0                    # output offsets are saved at least this often
MEMORY_KILL = b"exceeded memory limit"   # slurmstepd's line when it kills a job without cgroups
log = get_logger("lab_attendant.executors.slurm")


@dataclass(frozen=True)
class SlurmStatus:
    phase: Literal["waiting", "running", "ended"]
    end_state: RunState | None = None    # None: the worker's exit code and result decide
    why: str = ""


_WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
            "SUSPENDED", "RESIZING"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
_ENDED: dict[str, tuple[RunState | None, str]] = {
    "COMPLETED": (None, ""),
    "FAILED": (None, ""),
    "CANCELLED": (RunState.CANCELLED, "cancelled in Slurm (scancel from outside lab-attendant)"),
    "TIMEOUT": (RunState.TIMED_OUT, "Slurm's time limit (--time) ran out"),
    "DEADLINE": (RunState.TIMED_OUT, "Slurm's deadline (--deadline) passed"),
    "OUT_OF_MEMORY": (RunState.OOM, "Slurm ended it: out of memory (--mem)"),
    "NODE_FAIL": (RunState.LOST, "its Slurm node failed (NODE_FAIL)"),
    "BOOT_FAIL": (RunState.LOST, "its Slurm node failed to boot (BOOT_FAIL)"),
    "PREEMPTED": (RunState.LOST, "preempted by Slurm"),
    "REVOKED": (RunState.LOST, "revoked by Slurm (federation)"),
    "SPECIAL_EXIT": (RunState.FAILED, "Slurm ended it with SPECIAL_EXIT"),
}


def map_state(state: str, reason: str = "", *, memory_killed: bool = False) -> SlurmStatus:
    """Slurm's job state (as squeue/scontrol print it, e.g. "CANCELLED by 0") as ours.
    `memory_killed`: slurmstepd reported the job "exceeded memory limit" (no cgroups)."""
    name = state.split()[0].rstrip("+").upper() if state.strip() else ""
    if name in _WAITING:
        return SlurmStatus("waiting", why=f"Slurm: {name} ({reason})" if reason else name)
    if name in _RUNNING:
        return SlurmStatus("running")
    if memory_killed and name in ("FAILED", "CANCELLED", "OUT_OF_MEMORY"):
        return SlurmStatus("ended", RunState.OOM, "Slurm killed it: it exceeded its memory limit (--mem)")
    if name in _ENDED:
        end_state, why = _ENDED[name]
        return SlurmStatus("ended", end_state, why)
    return SlurmStatus("ended", RunState.LOST, f"unknown Slurm job state {state!r}")


def parse_exit_code(text: str) -> int | None:
    """scontrol's ExitCode=CODE:SIGNAL as a Popen-style return code (-N: ended by signal N)."""
    try:
        code, sig = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return -sig if sig else code


def time_limit_min(timeout_s: float, grace_s: float) -> int:
    return max(1, math.ceil((timeout_s + grace_s) / 60))


@dataclass(frozen=True)
class Request:
    """What a run asks Slurm for beyond the config: --mem and --gres, and why (for `show`)."""
    mem_bytes: int = 0
    gres: str = ""
    why: str = ""


def run_request(cfg: SlurmConfig, spec: RunSpec) -> Request:
    """Without [executor.slurm] mem_bytes / gres, a run with a model asks for what its memory plan
    says it needs (the cluster's DefMemPerCPU is often 1 GiB, less than a model run holds) and
    for one GPU when its model runs on cuda."""
    if spec.model is None:
        return Request()
    mem_bytes, gres, said = 0, "", []
    if not cfg.mem_bytes:
        try:
            mem_bytes, how = host_request(spec.model, spec.params.get("batch_size"))
            said.append(f"--mem={mem_bytes_arg(mem_bytes)} ({how})")
        except UserError as exc:   # the worker's own load will say more; Slurm's default applies
            log.warning("no --mem for the run: its model cannot be planned", run_id=spec.run_id,
                        error=str(exc))
            said.append(f"no --mem (the cluster's default): {exc}")
    if not cfg.gres and spec.model.device.startswith("cuda"):
        gres = "gpu:1"
        said.append(f"--gres=gpu:1 (model '{spec.model.name}' runs on {spec.model.device})")
    return Request(mem_bytes, gres, "; ".join(said))


def mem_bytes_arg(n: int) -> str:
    return f"{math.ceil(n / 1024**2)}M"


def sbatch_argv(cfg: SlurmConfig, *, job_name: str, run_dir: Path, timeout_s: float,
                script: Path, request: Request = Request()) -> list[str]:
    """The sbatch command line: config values, what the run's plan asks for (`request`) and our
    own paths only, never job params."""
    argv = ["sbatch", "--parsable", f"--job-name={job_name}", f"--chdir={run_dir}",
            f"--output={run_dir / OUTPUT_FILE}", "--open-mode=append",
            f"--time={time_limit_min(timeout_s, cfg.time_grace_s)}", "--export=ALL"]
    for flag, value in (("--partition", cfg.partition), ("--account", cfg.account),
                        ("--gres", cfg.gres or request.gres)):
        if value:
            argv.append(f"{flag}={value}")
    if cfg.cpus:
        argv.append(f"--cpus-per-task={cfg.cpus}")
    if cfg.mem_bytes or request.mem_bytes:
        argv.append(f"--mem={mem_bytes_arg(cfg.mem_bytes or request.mem_bytes)}")
    return [*argv, *cfg.extra_args, str(script)]


def batch_script(run_id: int, python: str, spec_path: Path, prefix: list[str] | None = None) -> str:
    """The job's script: exec the worker (behind its sandbox launcher, `prefix`, which execs it
    in turn), so Slurm's signals reach it directly."""
    argv = " ".join(shlex.quote(a) for a in
                    (*(prefix or []), python, "-m", "jobs.worker", str(spec_path)))
    return (f"#!/bin/sh\n# lab-attendant run {run_id}: params travel in the spec file only\n"
            "export PYTHONSAFEPATH=1   # --chdir is the run folder: keep it off sys.path\n"
            f"exec {argv}\n")


@dataclass(kw_only=True)
class SlurmRun(RunHandle):
    job_id: str                          # required here; None for local workers
    run_dir: Path
    events: FileTail
    output: FileTail
    memory_killed: bool = False
    ended_mono: float | None = None      # when Slurm was first seen to have ended it
    exit_code: int | None = None
    offsets_saved_mono: float = float("-inf")
    checked_mono: float | None = None    # the squeue round in which scontrol was last asked

    @property
    def where(self) -> str:
        return f"Slurm job {self.job_id}"


def job_name(state_dir: Path, run_id: int) -> str:
    """Names a run's job per lab (two labs may share a cluster): la-<state dir hash>-<run id>."""
    return f"la-{hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:8]}-{run_id}"


class SlurmExecutor:
    """The `slurm` executor (lab_attendant.executors.base.Executor): a batch job, followed through
    files on the shared filesystem; it outlives the daemon and is re-attached by job id."""
    is_local = False
    outlives_daemon = True

    def __init__(self, cfg: SlurmConfig, host: Host, *, state_dir: Path, kill_grace_s: float,
                 save_offsets: Callable[[int, dict[str, int]], None] = lambda *a: None,
                 fence: WorkerFence | None = None) -> None:
        self.cfg, self.host, self.state_dir = cfg, host, state_dir
        self.fence = fence                         # None: workers start unconfined
        self.kill_grace_s = kill_grace_s
        self.save_offsets = save_offsets           # persisted for a re-attach after a restart
        self._jobs: dict[str, tuple[str, str]] = {}  # job id -> (state, reason), last squeue
        self._tracked: set[str] = set()
        self._polled_mono = float("-inf")

    # -- commands ---------------------------------------------------------------------------
    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        try:
            return self.host.run(argv, timeout_s=COMMAND_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            raise OSError(f"{argv[0]} did not answer within {COMMAND_TIMEOUT_S:g} s") from None

    def start(self, spec: RunSpec, *, python: Path, timeout_s: float) -> SlurmRun:
        run_dir, spec_path = stage_run(spec)
        prefix = self.fence.launcher(spec, str(python), remote=True) if self.fence is not None else []
        script = write_atomic(run_dir / SCRIPT_FILE,
                              batch_script(spec.run_id, str(python), spec_path, prefix).encode())
        for name in (EVENTS_FILE, OUTPUT_FILE):   # a requeued run starts clean
            (run_dir / name).unlink(missing_ok=True)
        request = run_request(self.cfg, spec)
        argv = sbatch_argv(self.cfg, job_name=job_name(self.state_dir, spec.run_id),
                           run_dir=run_dir, timeout_s=timeout_s, script=script, request=request)
        proc = self._run(argv, env=worker_env(event_file=run_dir / EVENTS_FILE, run_dir=run_dir))
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not job_id.isdigit():
            raise OSError(f"sbatch refused the job: {(proc.stderr or proc.stdout).strip()}")
        now = self.host.monotonic()
        return self._track(SlurmRun(
            executor=self, run_id=spec.run_id, needs_paging=spec.needs_paging, job_id=job_id, run_dir=run_dir,
            started_mono=now, deadline_mono=now + timeout_s, requested=request.why,
            events=FileTail(run_dir / EVENTS_FILE), output=self._output_tail(run_dir)))

    def can_reattach(self, run: Any) -> bool:
        return bool(run.executor_job_id) and bool(run.run_dir)

    def reattach(self, run: Any, offsets: dict[str, int] | None) -> SlurmRun:
        """A run a previous daemon submitted: follow its job again, from the saved offsets."""
        offsets = offsets or {}
        run_dir = Path(run.run_dir)
        now, elapsed_s = self.host.monotonic(), self.host.time() - (run.started_at or self.host.time())
        return self._track(SlurmRun(
            executor=self, run_id=run.id, needs_paging=run.needs_paging, job_id=run.executor_job_id,
            run_dir=run_dir, started_mono=now - elapsed_s,
            deadline_mono=now - elapsed_s + run.timeout_s,
            events=FileTail(run_dir / EVENTS_FILE, offsets.get("events", 0)),
            output=self._output_tail(run_dir, offsets.get("output", 0))))

    @staticmethod
    def _output_tail(run_dir: Path, offset: int = 0) -> FileTail:
        return FileTail(run_dir / OUTPUT_FILE, offset, max_line_bytes=MAX_OUTPUT_LINE_BYTES)

    def _track(self, w: SlurmRun) -> SlurmRun:
        self._tracked.add(w.job_id)
        self._polled_mono = float("-inf")          # list it on the next poll
        return w

    def orphaned(self, run: Any) -> None:
        """A run whose job id was never recorded (the daemon died right after sbatch): cancel
        its job, if any, by name."""
        if not run.executor_job_id:
            self.cancel_by_name(run.id)

    def cancel_by_name(self, run_id: int) -> None:
        try:
            self._run(["scancel", f"--name={job_name(self.state_dir, run_id)}"])
        except OSError as exc:
            log.warning("could not scancel by name", run_id=run_id, error=str(exc))

    # -- watching ---------------------------------------------------------------------------
    def _refresh(self) -> None:
        now = self.host.monotonic()
        if now - self._polled_mono < self.cfg.poll_interval_s or not self._tracked:
            return
        self._polled_mono = now
        try:
            proc = self._run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%r",
                              f"--jobs={','.join(sorted(self._tracked))}"])
        except OSError as exc:
            proc = subprocess.CompletedProcess([], 1, "", str(exc))
        # A lone unknown id makes squeue fail: jobs it does not list are asked by scontrol.
        if proc.returncode != 0:
            log.warning("squeue failed; keeping the last known job states",
                        error=proc.stderr.strip()[:300])
        for line in proc.stdout.splitlines():
            job, state, reason = (line.split("|") + ["", ""])[:3]
            self._jobs[job.strip()] = (state.strip(), reason.strip())

    def _show_job(self, job_id: str) -> dict[str, str] | None:
        """scontrol's fields of one job; {} when Slurm no longer knows it; None: no answer."""
        try:
            proc = self._run(["scontrol", "--oneliner", "show", "job", job_id])
        except OSError:
            return None
        if proc.returncode != 0:
            return {} if "Invalid job id" in proc.stderr else None
        return dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok)

    def fds(self, w: SlurmRun) -> list[int]:
        return []                                  # files on a shared filesystem: polled

    def read_events(self, w: SlurmRun) -> list[protocol.Event | protocol.Rejected]:
        events = read_events(w.events)
        now = self.host.monotonic()
        significant = any(not isinstance(ev, (protocol.Progress, protocol.Heartbeat,
                                              protocol.Metric)) for ev in events)
        if significant or (now - w.offsets_saved_mono >= OFFSETS_EVERY_S
                           and (events or w.output.offset)):
            self._save_offsets(w)
        return events

    def _save_offsets(self, w: SlurmRun) -> None:
        w.offsets_saved_mono = self.host.monotonic()
        self.save_offsets(w.run_id, {"events": w.events.offset, "output": w.output.offset})

    def read_output(self, w: SlurmRun, *, final: bool = False) -> list[bytes]:
        lines = w.output.read_lines(final=final)
        if any(MEMORY_KILL in ln for ln in lines):
            w.memory_killed = True
        return lines

    def poll(self, w: SlurmRun) -> int | None:
        """None while the job waits or runs (or its last events may still be on the way);
        else a return code for classify(), with stop_state set where Slurm decided the end."""
        self._refresh()
        now = self.host.monotonic()
        if w.ended_mono is None:
            status = self._status(w)
            if status is not None and status.phase == "waiting":
                # The run's timeout counts from when Slurm runs it, not from its queue wait.
                w.deadline_mono += now - w.started_mono
                w.started_mono = now
            if status is None or status.phase != "ended":
                return None
            w.ended_mono = now
            if status.end_state is not None and w.stop_state is None:
                w.stop_state, w.stop_reason = status.end_state, status.why
        if w.result_path is None and w.error is None and now - w.ended_mono < self.cfg.settle_s:
            return None                              # its last events may still be in flight
        if w.exit_code is None:
            w.exit_how = f"{w.where} ended; its exit code is unknown"
            return protocol.EXIT_OK if w.result_path else protocol.EXIT_ERROR
        return w.exit_code

    def _status(self, w: SlurmRun) -> SlurmStatus | None:
        """Where its job is; None while that cannot be told (Slurm did not answer)."""
        known = self._jobs.get(w.job_id)
        if known is not None and map_state(*known).phase != "ended":
            return map_state(*known)
        if w.checked_mono == self._polled_mono:
            return None                              # scontrol was asked this round already
        w.checked_mono = self._polled_mono
        shown = self._show_job(w.job_id)             # ended or unlisted: its exit code
        if shown is None:
            return None
        if not shown and known is None:
            return SlurmStatus("ended", None if w.result_path else RunState.LOST,
                               f"Slurm no longer knows job {w.job_id} (ended longer than its "
                               "MinJobAge ago?)")
        w.exit_code = parse_exit_code(shown.get("ExitCode", ""))
        if shown:
            state, reason = shown["JobState"], shown.get("Reason", "")
        else:
            assert known is not None        # (neither shown nor known returned above)
            state, reason = known
        return map_state(state, reason, memory_killed=w.memory_killed)

    # -- stopping ---------------------------------------------------------------------------
    def stop(self, w: SlurmRun, state: RunState, reason: str, *,
             grace_s: float | None = None) -> None:
        if w.mark_stop(state, reason, grace_s, self.host.monotonic()):
            self._scancel(w, "TERM")

    def kill_now(self, w: SlurmRun) -> None:
        if w.kill_sent_mono is None:
            w.kill_sent_mono = self.host.monotonic()
        self._scancel(w, "KILL")

    def escalate(self, w: SlurmRun) -> bool:
        if w.grace_over(self.kill_grace_s, self.host.monotonic()):
            self.kill_now(w)
            return True
        return False

    def _scancel(self, w: SlurmRun, sig: str) -> None:
        # TERM: cancel the job (Slurm sends SIGTERM, and SIGKILL after its KillWait); KILL: now.
        argv = ["scancel", w.job_id] if sig == "TERM" else \
            ["scancel", "--full", f"--signal={sig}", w.job_id]
        try:
            proc = self._run(argv)
            if proc.returncode != 0:
                log.warning("scancel failed", job_id=w.job_id, error=proc.stderr.strip()[:300])
        except OSError as exc:
            log.warning("scancel failed", job_id=w.job_id, error=str(exc))
        self._polled_mono = float("-inf")

    def cleanup(self, w: SlurmRun) -> None:
        """The run ended or the daemon detaches from it: keep the offsets, stop watching."""
        self._save_offsets(w)
        self._tracked.discard(w.job_id)
        self._jobs.pop(w.job_id, None)

