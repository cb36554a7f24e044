"""The OS seam: clocks, process spawning, process-group signals, liveness and memory readings.

The daemon and launcher call only this; unit tests pass a FakeHost (tests/unit/fakes.py).
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import psutil


class Host:
    """The real host: subprocess, os.killpg, psutil."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def oom_kill_count(self) -> int | None:
        """Processes the kernel OOM killer has killed since boot (/proc/vmstat oom_kill, Linux 4.13+);
        None where unreadable. A rise during a run is the evidence behind an unexplained SIGKILL."""
        try:
            with open("/proc/vmstat") as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def spawn(self, argv: Sequence[str], *, cwd: Path, env: dict[str, str],
              pass_fds: Sequence[int], stdout: int) -> subprocess.Popen:
        # A new session makes the worker lead its own process group: one killpg reaches
        # every grandchild it forks (unless one of them calls setsid itself).
        return subprocess.Popen(list(argv), cwd=cwd, env=env, pass_fds=tuple(pass_fds),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)

    def killpg(self, pgid: int, sig: int) -> bool:
        """Signal a process group; False when it no longer exists (ESRCH is not an error)."""
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError as exc:  # pgid reused by someone else's group: leave it alone
            if exc.errno == errno.EPERM:
                return False
            raise

    def kill(self, pid: int, sig: int) -> bool:
        """Signal one process; False when it is gone or not ours to signal."""
        try:
            os.kill(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def group_alive(self, pgid: int) -> bool:
        return self.killpg(pgid, 0)

    def process_create_time(self, pid: int) -> float | None:
        try:
            return psutil.Process(pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def is_same_process(self, pid: int, create_time: float | None) -> bool:
        """True if `pid` is alive and is the process we started (not a reused pid). An unknown
        create time is no match: a row saying NULL could name anyone's process."""
        now = self.process_create_time(pid)
        if now is None or create_time is None:
            return False
        return abs(now - create_time) < 0.01

    def env_value(self, pid: int, name: str) -> str | None:
        """`name` in the environment `pid` started with (/proc/PID/environ); None where unset
        or unreadable (another user's process, a zombie, a pid gone)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            return None
        prefix = name.encode() + b"="
        for entry in environ.split(b"\0"):
            if entry.startswith(prefix):
                return entry[len(prefix):].decode("utf-8", "replace")
        return None

    def group_pids(self, pgid: int) -> list[int]:
        """Live members of process group `pgid` (/proc scan)."""
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc.pid)
            except (OSError, psutil.Error):
                continue
        return members

    def pid_alive(self, pid: int) -> bool:
        return self.process_create_time(pid) is not None

    def tree_pids(self, pid: int) -> set[int]:
        """A process and all its descendants (empty if it is gone)."""
        try:
            proc = psutil.Process(pid)
            return {pid, *(c.pid for c in proc.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def available_ram_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def start_command(self, argv: Sequence[str], env: dict[str, str] | None = None
                      ) -> tuple[subprocess.Popen, IO[bytes]]:
        """A configured command (argv list, never a shell string); its output goes to a temp
        file, not a pipe: a service it daemonizes may keep a pipe open forever."""
        out = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        except OSError as exc:
            out.write(f"cannot run {argv[0]}: {exc}".encode())
            proc = subprocess.Popen(["false"])
        return proc, out

    def run(self, argv: Sequence[str], *, timeout_s: float,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A short command (argv list, never a shell) run to its end; text output captured.
        OSError or subprocess.TimeoutExpired when it cannot run or runs too long."""
        return subprocess.run(list(argv), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout_s)

    def rss_tree_bytes(self, pid: int) -> int:
        """RSS of a process and all its descendants (0 if it is gone)."""
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total


SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}


def signal_name(signum: int) -> str:
    return SIGNAL_NAMES.get(signum, f"signal {signum}")


# -- GPU sensors ------------------------------------------------------------------------------------
@dataclass
class GpuReading:
    index: int
    temperature_c: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    processes: dict[int, int] = field(default_factory=dict)   # pid -> GPU bytes used
    throttle_reasons: list[str] = field(default_factory=list)
    power_w: float | None = None
    sm_clock_mhz: float | None = None

    def to_dict(self) -> dict:
        return {"index": self.index, "temperature_c": self.temperature_c,
                "power_w": self.power_w, "sm_clock_mhz": self.sm_clock_mhz,
                "memory_used_bytes": self.memory_used_bytes,
                "memory_total_bytes": self.memory_total_bytes,
                "processes": [{"pid": p, "used_bytes": b} for p, b in self.processes.items()],
                "throttle_reasons": self.throttle_reasons}


class SensorsUnavailable(Exception):
    """No GPU readings can be had (no NVML, no GPU, unreadable file); host guards still work."""


class SensorsFailed(SensorsUnavailable):
    """Sensors that had answered stopped (e.g. NVMLError_GpuIsLost): the thermal limit cannot be
    enforced until they return, so paging runs are held (guards.py)."""


class NoSensors:
    name = "none"

    def read(self) -> list[GpuReading]:
        raise SensorsUnavailable("GPU sensors are off ([guards] sensors = \"none\")")


class FileSensors:
    """Readings from a JSON file re-read at every poll: for simulation and e2e tests only.

    Format: {"gpus": [{"index": 0, "temperature_c": 60.0, "memory_used_bytes": 0,
    "memory_total_bytes": 11811160064, "processes": [{"pid": 123, "used_bytes": 0}],
    "power_w": 180.0, "sm_clock_mhz": 1545, "throttle_reasons": []}]}; a missing field means unknown.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"
        self._answered = False     # like NVML: failing after it answered is a lost GPU

    def read(self) -> list[GpuReading]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            error = SensorsFailed if self._answered else SensorsUnavailable
            raise error(f"sensor file {self.path} unreadable: {exc}") from None
        self._answered = True
        out = []
        for i, g in enumerate(data.get("gpus", [])):
            out.append(GpuReading(
                index=int(g.get("index", i)), temperature_c=g.get("temperature_c"),
                memory_used_bytes=g.get("memory_used_bytes"),
                memory_total_bytes=g.get("memory_total_bytes"),
                processes={int(p["pid"]): int(p.get("used_bytes") or 0)
                           for p in g.get("processes", [])},
                throttle_reasons=list(g.get("throttle_reasons", [])),
                power_w=g.get("power_w"), sm_clock_mhz=g.get("sm_clock_mhz")))
        return out


class NvmlSensors:
    """The real readings, through NVML (package nvidia-ml-py). Every NVML call is guarded: a failed
    init or read is retried with back-off (1 s doubling to 60 s), never cached for good. Once NVML
    has answered, a failure raises SensorsFailed (the GPU may be lost: Xid 79 on a hot card)."""

    name = "nvml"
    RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0

    def __init__(self, nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._module = nvml                # pynvml, or a fake in tests
        self._nvml: Any = None             # the module once nvmlInit succeeded
        self._clock = clock
        self._error = ""
        self._retry_at = float("-inf")
        self._backoff_s = self.RETRY_FIRST_S
        self._answered = False             # NVML has initialized at least once

    def _failure(self, why: str) -> SensorsUnavailable:
        if self._clock() >= self._retry_at:     # a new failure, not a wait for the next retry
            self._error = why
            self._retry_at = self._clock() + self._backoff_s
            self._backoff_s = min(2 * self._backoff_s, self.RETRY_MAX_S)
        text = f"{self._error}; retrying in {max(0.0, self._retry_at - self._clock()):.0f} s"
        return (SensorsFailed if self._answered else SensorsUnavailable)(text)

    def _init(self) -> Any:
        if self._nvml is None:
            if self._clock() < self._retry_at:
                raise self._failure(self._error)
            try:
                nv = self._module or importlib.import_module("pynvml")
                nv.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - any NVML failure means "no GPU readings"
                raise self._failure(f"NVML unavailable ({type(exc).__name__}: {exc})") from None
            self._nvml, self._answered = nv, True
        return self._nvml

    def read(self) -> list[GpuReading]:
        nv = self._init()
        try:
            out = [self._read_gpu(nv, i) for i in range(nv.nvmlDeviceGetCount())]
        except Exception as exc:  # noqa: BLE001 - GpuIsLost, Unknown, a driver reload: re-init later
            self._nvml = None
            try:
                nv.nvmlShutdown()
            except Exception:  # noqa: BLE001 - it is already broken; the read error is the news
                pass
            raise self._failure(f"NVML read failed ({type(exc).__name__}: {exc})") from None
        self._backoff_s, self._retry_at = self.RETRY_FIRST_S, float("-inf")
        return out

    def _throttle(self, nv, handle) -> list[str]:
        getter = (getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                  or getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons"))
        mask = getter(handle)
        names = []
        for attr in dir(nv):
            for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
                if attr.startswith(prefix) and attr[len(prefix):] not in ("All", "None", "Unknown"):
                    bit = getattr(nv, attr)
                    if isinstance(bit, int) and bit and mask & bit:
                        names.append(attr[len(prefix):])
        return sorted(set(names))

    def _read_gpu(self, nv, i: int) -> GpuReading:
        h = nv.nvmlDeviceGetHandleByIndex(i)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        procs: dict[int, int] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses",
                       "nvmlDeviceGetGraphicsRunningProcesses"):
            try:   # optional readings (not on every board or driver); a lost GPU fails below
                for p in getattr(nv, getter)(h):
                    procs[p.pid] = procs.get(p.pid, 0) + int(p.usedGpuMemory or 0)
            except nv.NVMLError:
                pass
        try:
            throttle = self._throttle(nv, h)
        except nv.NVMLError:
            throttle = []
        return GpuReading(
            index=i, temperature_c=float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            memory_used_bytes=int(mem.used), memory_total_bytes=int(mem.total),
            processes=procs, throttle_reasons=throttle,
            power_w=_optional(nv, lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            sm_clock_mhz=_optional(nv, lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))))


def _optional(nv, read: Callable[[], float]) -> float | None:
    """A reading not every board or driver offers (power, clocks): None where it fails."""
    try:
        return read()
    except (nv.NVMLError, AttributeError):
        return None


def make_sensors(spec: str):
    """'nvml' (default), 'none', or 'file:PATH'."""
    if spec == "nvml":
        return NvmlSensors()
    if spec == "none":
        return NoSensors()
    if spec.startswith("file:"):
        return FileSensors(Path(spec[5:]).expanduser())
    raise ValueError(f"unknown sensors {spec!r}: use \"nvml\", \"none\" or \"file:PATH\"")
