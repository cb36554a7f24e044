"""The device a run really has, as a memplan.DeviceProfile: free memory from the CUDA driver (or the host's
MemAvailable on cpu), capped by the model's device_memory_bytes; read at load, before any weight."""
from __future__ import annotations

from dataclasses import replace

import torch

from jobs.paging.plan.expert_budget import mem_available_bytes
from jobs.paging.plan.profiles import DeviceProfile, cpu_profile


def runtime_profile(device: torch.device, device_memory_bytes: int | None = None) -> DeviceProfile:
    """CUDA: torch.cuda.mem_get_info's free bytes (the context already exists, so it costs nothing more);
    device_memory_bytes caps it, e.g. to emulate a smaller card on a big one."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        memory = free if device_memory_bytes is None else min(free, device_memory_bytes)
        return DeviceProfile(f"{device} ({torch.cuda.get_device_name(device)})", "cuda", int(memory), 0, 0.0,
                             torch.cuda.get_device_capability(device), mem_available_bytes(),
                             note="free memory at load")
    cpu = cpu_profile()
    if device_memory_bytes is None:
        return cpu
    memory = min(cpu.memory_bytes, device_memory_bytes) if cpu.memory_bytes else device_memory_bytes
    return replace(cpu, memory_bytes=int(memory))
