"""`lab-attendant model plan` and the submit-time fit check: jobs.paging.plan.memplan run by the supervisor
(stdlib + NVML, no torch), so an impossible run is refused before it is queued, and a model can be planned
from a folder holding only config.json, before its weights are downloaded, or from a GGUF file's header."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from jobs.contract.model_facts import ModelFacts
from jobs.contract.spec import DEFAULT_BATCH_SIZE, ModelSpec
from jobs.contract.units import format_size
from jobs.paging.plan.disk import remembered_read_bandwidth
from jobs.paging.plan.expert_budget import mem_available_bytes
from jobs.paging.plan.faster import faster_options
from jobs.paging.plan.gguf_header import SPLIT_RE, is_gguf, read_header
from jobs.paging.plan.memplan import MemoryPlan, PlanRequest, make_plan
from jobs.paging.plan.profiles import PROFILES, DeviceProfile, dtype_for, fp16_safe_for, pcie_bytes_per_s, profile
from jobs.paging.plan.settings import is_moe_folder
from jobs.paging.plan.shape import ModelShape, shape_from_path
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


def is_model_path(path: Path) -> bool:
    """A GGUF file (any part of a split one) or a folder with config.json: what a model path may name."""
    return is_gguf(path) or (path / "config.json").is_file()


def model_shape(spec: ModelSpec) -> ModelShape:
    """The shape of spec's folder or GGUF file, header only; UserError with what to do when unreadable."""
    path = Path(spec.path)
    try:
        return shape_from_path(path)
    except FileNotFoundError:
        raise UserError(f"model '{spec.name}' path {path} is neither a GGUF file nor a folder with config.json; "
                        f"point [models.{spec.name}] path (or the argument) at a .gguf file or a Hugging Face "
                        "model folder") from None
    except (KeyError, ValueError) as exc:
        raise UserError(f"model '{spec.name}' at {path} cannot be planned: {exc}") from None


def plan_model(spec: ModelSpec, device: DeviceProfile, *, batch: int, context: int | None = None,
               disk_bytes_per_s: float | None = None, state_dir: Path | None = None,
               host_ram_bytes: int | None = None, job: tuple[int, int] | None = None) -> MemoryPlan:
    """The plan, its disk-aware bound and what would make it faster. The disk bandwidth is the argument's,
    else [models.NAME] disk_bytes_per_s, else what a probe measured on the model's disk (state_dir);
    `job` = (prompts, new tokens each) adds the least time such a job takes."""
    shape = model_shape(spec)
    dtype = dtype_for(spec.dtype, device.capability)     # as the engine resolves them on that device
    safe = fp16_safe_for(spec.fp16_safe, dtype, shape.model_type)
    source = "--disk-bandwidth" if disk_bytes_per_s else ""
    if not disk_bytes_per_s and spec.disk_bytes_per_s:
        disk_bytes_per_s, source = float(spec.disk_bytes_per_s), f"[models.{spec.name}] disk_bytes_per_s"
    if not disk_bytes_per_s and state_dir is not None:
        remembered = remembered_read_bandwidth(state_dir, Path(spec.path))
        if remembered:
            disk_bytes_per_s, source = remembered
    request = PlanRequest.for_model(spec, batch=batch, dtype=dtype, fp16_safe=safe,
                                    disk_bytes_per_s=disk_bytes_per_s, disk_source=source)
    if context:
        request = dataclasses.replace(request, context=context)
    if spec.device_memory_bytes is not None and spec.device_memory_bytes < device.memory_bytes:
        device = dataclasses.replace(device, memory_bytes=spec.device_memory_bytes, note="capped by device_memory_bytes")
    if host_ram_bytes is not None:
        device = dataclasses.replace(device, host_ram_bytes=host_ram_bytes)
        if device.kind == "cpu":
            device = dataclasses.replace(device, memory_bytes=host_ram_bytes)
    plan = make_plan(shape, device, request, spec.name)
    plan.faster = faster_options(shape, device, request, plan)
    if job:
        prompts, tokens = job
        plan.job = {"prompts": prompts, "tokens": tokens, "seconds": plan.job_seconds(prompts, tokens)}
    return plan


def path_spec(path: Path) -> ModelSpec:
    """A model folder or GGUF file named on the command line, planned with the default settings."""
    if is_gguf(path):
        split = SPLIT_RE.match(path.name)
        name = split["stem"] if split else path.name.removesuffix(".gguf")
        return ModelSpec(name=name, path=str(path), kind="moe" if model_shape(
            ModelSpec(name=name, path=str(path))).moe else "dense", device="cuda")
    return ModelSpec(name=path.name, path=str(path), kind="moe" if is_moe_folder(path) else "dense",
                     device="cuda")


def check_fits(spec: ModelSpec, batch: int | None) -> None:
    """Submit-time refusal of a run whose model cannot fit its device (UserError, exit 2). A CUDA model on a
    machine whose GPU NVML cannot see is left to the worker, which plans against the real device at load."""
    device = profile("cpu") if spec.device == "cpu" else local_gpu()
    if device is None or not is_model_path(Path(spec.path)):
        return
    plan = plan_model(spec, device, batch=batch or DEFAULT_BATCH_SIZE)
    if not plan.fits:
        raise UserError(f"model '{spec.name}' does not fit {device.name}: {plan.reason} "
                        f"(see `lab-attendant model plan {spec.name}`)")


# What a worker holds beyond the plan's bytes: the interpreter with torch and transformers imported,
# the kinds' sentence embedder and, for a cuda model, the CUDA runtime's host side.
WORKER_BASE_BYTES = 1024**3
HOST_REQUEST_MARGIN = 0.25          # the plan's host peak is an estimate: ask a quarter more
REQUEST_STEP_BYTES = 256 * 1024**2  # requests round up to this, so they read as round figures


def host_request(spec: ModelSpec, batch: int | None) -> tuple[int, str]:
    """The host memory a run of `spec` asks a batch system for: the memory plan's host peak (the
    whole peak for a cpu model; pinned and RAM cache rows for a cuda one, planned against the
    reference card) plus a margin and the worker's own base; (bytes, how it was counted).
    UserError when the model cannot be planned."""
    cpu = spec.device == "cpu"
    plan = plan_model(spec, profile("cpu" if cpu else "rtx2080ti"), batch=batch or DEFAULT_BATCH_SIZE)
    host_bytes = plan.peak_device_bytes if cpu else plan.host_ram_bytes
    want = int(host_bytes * (1 + HOST_REQUEST_MARGIN)) + WORKER_BASE_BYTES
    want = -(-want // REQUEST_STEP_BYTES) * REQUEST_STEP_BYTES
    return want, (f"the memory plan's host peak {format_size(host_bytes)} + "
                  f"{HOST_REQUEST_MARGIN:.0%} + {format_size(WORKER_BASE_BYTES)} for the worker itself")


def model_facts(path: Path) -> ModelFacts:
    """What the kinds' submit checks ask of a model (head size, chat template), from a folder's JSON files
    or a GGUF file's header; a path neither can read gives unknown facts (the run's own load says why)."""
    if not is_gguf(path):
        return ModelFacts.of_folder(path)
    try:
        header = read_header(path)
        head_dim = shape_from_path(path).head_dim
    except (OSError, ValueError, UserError) as exc:
        log.debug("no facts from %s: %s", path, exc)
        return ModelFacts(str(path))
    return ModelFacts(str(path), head_dim, bool(header.metadata.get("tokenizer.chat_template")))
