"""Fakes shared by the unit tests: FakeHost (a controllable clock and a record of signals, in
place of lab_attendant.guards.host.Host), fake sensors, and a FakeLocalExecutor (the real
LocalExecutor's stop/kill/escalate with scripted workers) around a real Daemon and SQLite store."""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.contract import protocol
from jobs.contract.spec import RunSpec
from lab_attendant.config import parse_config
from lab_attendant.daemon.loop import Daemon
from lab_attendant.executors.local import LocalExecutor, LocalRun
from lab_attendant.store.states import RunState


class FakeHost:
    def __init__(self) -> None:
        self.now = 1000.0
        self.signals: list[tuple[int, int]] = []     # (pgid, signal)
        self.alive_groups: set[int] = set()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    sleep = advance

    def killpg(self, pgid: int, sig: int) -> bool:
        self.signals.append((pgid, sig))
        return pgid in self.alive_groups

    def group_alive(self, pgid: int) -> bool:
        return pgid in self.alive_groups

    def process_create_time(self, pid: int) -> float | None:
        return None

    oom_kills = 7                         # the kernel OOM killer's count (/proc/vmstat oom_kill)

    def oom_kill_count(self) -> int | None:
        return self.oom_kills

    # memory readings for the guard policy
    rss: dict[int, int]
    available_ram: int

    def rss_tree_bytes(self, pid: int) -> int:
        return self.__dict__.setdefault("rss", {}).get(pid, 0)

    def available_ram_bytes(self) -> int:
        return self.__dict__.get("available_ram", 16 * 1024**3)

    def tree_pids(self, pid: int) -> set[int]:
        return {pid, pid + 1}             # the worker and one child


class FakeSensors:
    """Readings set by the test; None makes them unavailable."""

    def __init__(self) -> None:
        self.gpus = []

    def read(self):
        from lab_attendant.guards.host import SensorsUnavailable
        if self.gpus is None:
            raise SensorsUnavailable("no NVML in this test")
        return self.gpus


class FakeNvml:
    """Stands in for the pynvml module: one GPU whose NVML can be made to fail the way a GPU that
    fell off the bus does (NVMLError_GpuIsLost), or never to initialize (no driver)."""

    class NVMLError(Exception):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, temperature_c: float = 60.0) -> None:
        self.temperature_c = temperature_c
        self.lost = False                  # every device call raises GpuIsLost
        self.no_driver = False             # nvmlInit raises DriverNotLoaded
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.no_driver:
            raise self.NVMLError_DriverNotLoaded("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        pass

    def _device(self):
        if self.lost:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return object()

    def nvmlDeviceGetCount(self) -> int:
        self._device()
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int):
        return self._device()

    def nvmlDeviceGetMemoryInfo(self, h):
        self._device()
        return type("Mem", (), {"used": 1 << 30, "total": 11 << 30})()

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return []

    nvmlDeviceGetGraphicsRunningProcesses = nvmlDeviceGetComputeRunningProcesses

    def nvmlDeviceGetCurrentClocksEventReasons(self, h) -> int:
        return 0

    def nvmlDeviceGetTemperature(self, h, sensor: int) -> float:
        self._device()
        return self.temperature_c


EXIT_TERMINATED = 128 + signal.SIGTERM          # what jobs.worker returns after SIGTERM


@dataclass
class FakeProc:
    pid: int
    obeys_sigterm: bool = True
    exit_code: int | None = None                # set by the test: the worker ended by itself


@dataclass
class FakeLocalExecutor(LocalExecutor):
    """The real LocalExecutor's stop/kill/escalate, with scripted workers instead of processes."""
    host: FakeHost = field(default_factory=FakeHost)
    kill_grace_s: float = 2.0
    specs: list[RunSpec] = field(default_factory=list)
    procs: dict[int, FakeProc] = field(default_factory=dict)     # run id -> its worker
    events: dict[int, list[protocol.Event | protocol.Rejected]] = field(default_factory=dict)
    obeys_sigterm: bool = True

    def start(self, spec: RunSpec, *, python: Path, timeout_s: float) -> LocalRun:
        self.specs.append(spec)
        proc = FakeProc(pid=5000 + spec.run_id, obeys_sigterm=self.obeys_sigterm)
        self.procs[spec.run_id] = proc
        self.host.alive_groups.add(proc.pid)
        now = self.host.monotonic()
        return LocalRun(executor=self, run_id=spec.run_id, needs_paging=spec.needs_paging, proc=proc,
                      events_fd=-1, output_fd=-1, started_mono=now, deadline_mono=now + timeout_s,
                      oom_kills_at_start=self.host.oom_kill_count())

    def emit(self, run_id: int, event: str, **fields: Any) -> None:
        # Through the real codec: the daemon sees what a worker's line decodes to.
        self.events.setdefault(run_id, []).append(protocol.decode(protocol.encode(event, **fields)))

    def finish(self, run_id: int, code: int, result: str | None = None) -> None:
        if result:
            self.emit(run_id, protocol.RESULT, path=result)
        self.procs[run_id].exit_code = code

    def read_events(self, w: LocalRun) -> list[protocol.Event | protocol.Rejected]:
        return self.events.pop(w.run_id, [])

    def read_output(self, w: LocalRun, *, final: bool = False) -> list[bytes]:
        return []

    def poll(self, w: LocalRun) -> int | None:
        proc = self.procs[w.run_id]
        sent = {sig for pgid, sig in self.host.signals if pgid == proc.pid}
        if proc.exit_code is None and signal.SIGKILL in sent:
            proc.exit_code = -signal.SIGKILL
        elif proc.exit_code is None and signal.SIGTERM in sent and proc.obeys_sigterm:
            proc.exit_code = EXIT_TERMINATED
        return proc.exit_code

    def cleanup(self, w: LocalRun) -> None:
        self.host.alive_groups.discard(w.pgid)


def make_daemon(tmp_path: Path, *, paging: bool = True, **sections: Any) -> tuple[Daemon, FakeLocalExecutor, FakeSensors]:
    cfg = parse_config({"paths": {"state_dir": "var"}, "worker": {"python": sys.executable},
                        "limits": {"kill_grace_s": 2.0, "shutdown_grace_s": 30.0},
                        "guards": {"guard_interval_s": 1.0, "min_available_ram_bytes": 0},
                        **sections}, base_dir=tmp_path, source=None)
    host, sensors = FakeHost(), FakeSensors()
    launcher = FakeLocalExecutor(host=host, kill_grace_s=cfg.limits.kill_grace_s)
    daemon = Daemon(cfg, experimental_paging=paging, host=host, local_executor=launcher, sensors=sensors)
    daemon.open()
    return daemon, launcher, sensors


def submit(d: Daemon, kind: str = "probe", *, timeout_s: float = 600.0, **params: Any) -> int:
    return d.store.submit(kind=kind, params=params, priority=0, timeout_s=timeout_s,
                          needs_paging=d.kinds[kind].needs_paging).id


def run_state(d: Daemon, run_id: int) -> tuple[RunState, str]:
    run = d.store.get(run_id)
    return run.state, run.reason
