"""The device a run really has, as a memplan.DeviceProfile: free memory from the CUDA driver (or the host's
MemAvailable on cpu), capped by the model's device_memory_bytes; read at load, before any weight."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from jobs.paging.plan.expert_budget import mem_available_bytes
from jobs.paging.plan.profiles import DeviceProfile, cpu_profile

logger = logging.getLogger(__name__)

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
# Expandable segments: blocks freed by the side stream (a resident layer's bf16 copy before conversion, a
# staging temporary) return to one growable segment KV and activations can reuse, instead of stranding
# fixed-size segments on an 11 GB card where the plan leaves a few hundred MiB of margin.
ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(device: torch.device) -> str | None:
    """Before the run's first CUDA allocation: PYTORCH_CUDA_ALLOC_CONF = ALLOC_CONF unless the user set one
    (theirs is kept). Returns the setting in force for a CUDA device, None on cpu or when CUDA was already
    initialised in this process (too late to change; said in the log)."""
    if device.type != "cuda":
        return None
    if ALLOC_CONF_ENV not in os.environ:
        if torch.cuda.is_initialized():
            logger.warning("CUDA was initialised before the model was opened: %s stays unset, so the allocator "
                           "keeps fixed segments", ALLOC_CONF_ENV)
            return None
        os.environ[ALLOC_CONF_ENV] = ALLOC_CONF
    return os.environ[ALLOC_CONF_ENV]


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
