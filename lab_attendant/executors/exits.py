"""How a reaped worker ended, whatever executor ran it: its exit code, why the daemon stopped it
and what it reported (WorkerExit) -> the run's final state and the sentence that says why (classify).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

from jobs.contract import protocol
from jobs.contract.units import format_size
from lab_attendant.guards.host import signal_name
from lab_attendant.store.states import RunState


@dataclass(frozen=True)
class WorkerExit:
    """What is known once a worker is reaped: everything classify() decides from."""
    code: int                              # Popen returncode; -N: ended by signal N
    stop_state: RunState | None = None     # the daemon stopped it, to end in this state
    stop_reason: str = ""
    forced: bool = False                   # SIGKILL after the grace ran out
    result_path: str | None = None         # from the worker's `result` event
    error: protocol.WorkerError | None = None   # its `error` event
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
        return RunState.OOM, f"{_oom_sentence(x.error)}{err or 'worker reported OOM'}"
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


def _oom_sentence(e: protocol.WorkerError | None) -> str:
    """"out of GPU memory: requested 2.0 GiB with 1.0 GiB free of 10.8 GiB (9.1 GiB reserved by
    torch); " from the worker's error event (jobs/contract/oom.py), as much of it as the worker could read."""
    if e is None:
        return "out of memory: "

    def size(key: str) -> str:
        value = e.get(key)
        return format_size(value) if isinstance(value, (int, float)) else "?"
    parts = []
    if e.get("requested_bytes") is not None:
        parts.append(f"requested {size('requested_bytes')}")
    if e.get("free_bytes") is not None:
        parts.append(f"with {size('free_bytes')} free of {size('total_bytes')} "
                     f"({size('reserved_bytes')} reserved by torch)")
    what = _OOM_KINDS.get(e.get("oom_kind"), "memory")
    return f"out of {what}: " + (" ".join(parts) + "; " if parts else "")
