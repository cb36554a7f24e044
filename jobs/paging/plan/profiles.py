"""Devices the memory plan plans for: named card profiles, the host as a device, what a profile holds, and
the numerics a device implies (dtype "auto", fp16-safe "auto"), stdlib only so the supervisor resolves them
as the engine does (jobs.paging.runtime builds a profile from the real CUDA device at load)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from jobs.paging.plan.expert_budget import mem_available_bytes

GiB = 1024**3
MiB = 1024**2
NATIVE_BF16_FROM = (8, 0)   # Ampere: bf16 tensor cores; Turing (sm_75) computes bf16 only emulated
# model_type values whose activations are known to exceed fp16's range (65504): Gemma's residual stream
# grows to ~1e5 and its MLP products saturate; fp16_safe = "auto" turns the fp16-safe path on for these only.
OVERFLOWS_FP16 = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"})


def dtype_for(requested: str, capability: tuple[int, int] | None) -> str:
    """The compute dtype name for `requested` ("auto", "fp32", "bf16", "fp16") on a device of `capability`
    (None: the CPU): auto is fp32 on the CPU, bf16 where the card has it natively, fp16 on older CUDA cards."""
    if requested != "auto":
        return requested
    if capability is None:
        return "fp32"
    return "bf16" if tuple(capability) >= NATIVE_BF16_FROM else "fp16"


def fp16_safe_for(setting: str, dtype: str, model_type: str) -> bool:
    """Whether the fp16-safe path runs: "on"/"off" as set, "auto" in fp16 for models in OVERFLOWS_FP16; only
    fp16 ever needs it (bf16 and fp32 have fp32's range)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fp16_safe {setting!r} is not one of auto, on, off")
    return dtype == "fp16" and (setting == "on" or (setting == "auto" and model_type in OVERFLOWS_FP16))


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


# Pinned host -> device copies on an x16 link of each PCIe generation, as measured on such links; a
# narrower link scales by width/16 (pcie_bytes_per_s).
PCIE_X16_BYTES_PER_S = {3: 12e9, 4: 25e9, 5: 50e9}


def pcie_bytes_per_s(gen: int, width: int = 16) -> float:
    return PCIE_X16_BYTES_PER_S.get(int(gen), PCIE_X16_BYTES_PER_S[3]) * int(width) / 16


# Usable memory as CUDA reports it once the driver has its share; h2d from the link's generation.
PROFILES: dict[str, DeviceProfile] = {
    "rtx2080ti": DeviceProfile("rtx2080ti", "cuda", int(10.76 * GiB), 400 * MiB, pcie_bytes_per_s(3), (7, 5),
                               note="RTX 2080 Ti 11 GB, Turing sm_75 (fp16 only), PCIe 3.0 x16"),
    "rtx3060": DeviceProfile("rtx3060", "cuda", int(11.76 * GiB), 400 * MiB, pcie_bytes_per_s(4), (8, 6),
                             note="RTX 3060 12 GB, Ampere sm_86, PCIe 4.0 x16"),
    "rtx4090": DeviceProfile("rtx4090", "cuda", int(23.64 * GiB), 450 * MiB, pcie_bytes_per_s(4), (8, 9),
                             note="RTX 4090 24 GB, Ada sm_89, PCIe 4.0 x16"),
    "h100": DeviceProfile("h100", "cuda", int(79.1 * GiB), 500 * MiB, pcie_bytes_per_s(5), (9, 0),
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
