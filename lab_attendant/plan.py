"""`lab-attendant model plan` and the submit-time fit check: jobs.paging.plan.memplan run by the supervisor
(stdlib + NVML, no torch), so an impossible run is refused before it is queued, and a model can be planned
from a folder holding only config.json, before its weights are downloaded."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from jobs.contract.spec import DEFAULT_BATCH_SIZE, ModelSpec
from jobs.paging.plan.expert_budget import mem_available_bytes
from jobs.paging.plan.memplan import MemoryPlan, PlanRequest, make_plan
from jobs.paging.plan.profiles import PROFILES, DeviceProfile, dtype_for, fp16_safe_for, pcie_bytes_per_s, profile
from jobs.paging.plan.settings import is_moe_folder
from jobs.paging.plan.shape import shape_from_folder
from lab_attendant.errors import UserError

log = logging.getLogger(__name__)
PROFILE_CHOICES = (*PROFILES, "cpu", "auto")
_CONTEXT_BYTES = 400 * 1024**2      # what a CUDA context takes before the first tensor


def local_gpu(nvml=None) -> DeviceProfile | None:
    """GPU 0 as NVML sees it now (free memory, capability, PCIe link); None without one."""
    try:
        nv = nvml or __import__("pynvml")
        nv.nvmlInit()
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(0)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            capability = tuple(nv.nvmlDeviceGetCudaComputeCapability(handle))
            name = nv.nvmlDeviceGetName(handle)
            gen = nv.nvmlDeviceGetMaxPcieLinkGeneration(handle)
            width = nv.nvmlDeviceGetMaxPcieLinkWidth(handle)
        finally:
            nv.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - no driver, no GPU, or no pynvml: there is no local GPU to plan for
        log.debug("no local GPU via NVML: %s", exc)
        return None
    name = name.decode() if isinstance(name, bytes) else str(name)
    bandwidth = pcie_bytes_per_s(gen, width)
    return DeviceProfile(f"auto ({name})", "cuda", int(memory.free), _CONTEXT_BYTES, bandwidth, capability,
                         mem_available_bytes(), note="GPU 0 via NVML: memory free now")


def device_profile(name: str) -> DeviceProfile:
    if name == "auto":
        gpu = local_gpu()
        if gpu is None:
            raise UserError("--device-profile auto found no GPU (NVML did not answer); name one of "
                            f"{', '.join(PROFILES)} or cpu")
        return gpu
    try:
        return profile(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def plan_model(spec: ModelSpec, device: DeviceProfile, *, batch: int, context: int | None = None,
               disk_bytes_per_s: float | None = None) -> MemoryPlan:
    path = Path(spec.path)
    try:
        shape = shape_from_folder(path)
    except FileNotFoundError:
        raise UserError(f"model '{spec.name}' folder {path} has no config.json; point [models.{spec.name}] path "
                        "(or the folder argument) at a Hugging Face model folder") from None
    except (KeyError, ValueError) as exc:
        raise UserError(f"config.json in {path} cannot be planned: {exc}") from None
    dtype = dtype_for(spec.dtype, device.capability)     # as the engine resolves them on that device
    safe = fp16_safe_for(spec.fp16_safe, dtype, shape.model_type)
    request = PlanRequest.for_model(spec, batch=batch, dtype=dtype, fp16_safe=safe, disk_bytes_per_s=disk_bytes_per_s)
    if context:
        request = dataclasses.replace(request, context=context)
    if spec.device_memory_bytes is not None and spec.device_memory_bytes < device.memory_bytes:
        device = dataclasses.replace(device, memory_bytes=spec.device_memory_bytes, note="capped by device_memory_bytes")
    return make_plan(shape, device, request, spec.name)


def folder_spec(folder: Path) -> ModelSpec:
    """A model folder named on the command line, planned with the default settings."""
    return ModelSpec(name=folder.name, path=str(folder), kind="moe" if is_moe_folder(folder) else "dense",
                     device="cuda")


def check_fits(spec: ModelSpec, batch: int | None) -> None:
    """Submit-time refusal of a run whose model cannot fit its device (UserError, exit 2). A CUDA model on a
    machine whose GPU NVML cannot see is left to the worker, which plans against the real device at load."""
    device = profile("cpu") if spec.device == "cpu" else local_gpu()
    if device is None or not (Path(spec.path) / "config.json").is_file():
        return
    plan = plan_model(spec, device, batch=batch or DEFAULT_BATCH_SIZE)
    if not plan.fits:
        raise UserError(f"model '{spec.name}' does not fit {device.name}: {plan.reason} "
                        f"(see `lab-attendant model plan {spec.name}`)")
