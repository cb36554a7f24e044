"""FakeHost: a controllable clock and a record of signals, in place of lab_attendant.guards.host.Host."""
from __future__ import annotations


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
