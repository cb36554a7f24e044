"""Devices the memory plan plans for: named card profiles, the host as a device, and what a profile holds
(stdlib only; jobs.paging.runtime builds one from the real CUDA device at load)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from jobs.paging.expert_budget import mem_available_bytes

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str                     # "cuda" or "cpu"
    memory_bytes: int             # what this process may use on the device
    context_bytes: int            # taken before any tensor: CUDA context, cuBLAS workspace
    h2d_bytes_per_s: float        # pinned host -> device copies (0 on cpu: nothing crosses)
    capability: tuple[int, int] | None = None
    host_ram_bytes: int | None = None   # host memory available to the run (None: not known)
    note: str = ""


# Usable memory as CUDA reports it once the driver has its share; h2d is pinned copies as measured on
# such links (PCIe 3.0 x16 ~12 GB/s, 4.0 ~25 GB/s, 5.0 ~50 GB/s).
PROFILES: dict[str, DeviceProfile] = {
    "rtx2080ti": DeviceProfile("rtx2080ti", "cuda", int(10.76 * GiB), 400 * MiB, 12e9, (7, 5),
                               note="RTX 2080 Ti 11 GB, Turing sm_75 (fp16 only), PCIe 3.0 x16"),
    "rtx3060": DeviceProfile("rtx3060", "cuda", int(11.76 * GiB), 400 * MiB, 24e9, (8, 6),
                             note="RTX 3060 12 GB, Ampere sm_86, PCIe 4.0 x16"),
    "rtx4090": DeviceProfile("rtx4090", "cuda", int(23.64 * GiB), 450 * MiB, 25e9, (8, 9),
                             note="RTX 4090 24 GB, Ada sm_89, PCIe 4.0 x16"),
    "h100": DeviceProfile("h100", "cuda", int(79.1 * GiB), 500 * MiB, 50e9, (9, 0),
                          note="H100 80 GB, Hopper sm_90, PCIe 5.0 x16"),
}


def cpu_profile() -> DeviceProfile:
    """The host itself as the device: layers compute where they are read."""
    available = mem_available_bytes() or 0
    return DeviceProfile("cpu", "cpu", available, 0, 0.0, None, available, note="host RAM (MemAvailable)")


def profile(name: str, *, host_ram_bytes: int | None = None) -> DeviceProfile:
    if name == "cpu":
        return cpu_profile()
    if name not in PROFILES:
        raise ValueError(f"unknown device profile {name!r}: use one of {', '.join([*PROFILES, 'cpu', 'auto'])}")
    return replace(PROFILES[name], host_ram_bytes=host_ram_bytes if host_ram_bytes is not None
                   else mem_available_bytes())
