"""The typed specs that cross the supervisor -> worker -> engine boundary (stdlib only).

`ModelSettings` holds every model tunable with its one default; the config's [models.NAME] table,
the run's `ModelSpec` and the engine's `open_model` all read these fields. `RunSpec` is the
worker's spec file: built once by the daemon, written as JSON, read once by the worker, strictly.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs.contract.errors import SpecError
from jobs.contract.typed import ByteSize, Reader

SPEC_VERSION = 2                      # 2: ModelSettings gained context_tokens and device_memory_bytes
DEFAULT_MODEL = "gemma-3-270m"        # the embedded model (`lab-attendant model import-default`)
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"  # its packaged GGUF, under models_dir: what it streams
DEFAULT_BATCH_SIZE = 8                # prompts per pass over the weights when a run does not say
DEFAULT_CONTEXT_TOKENS = 2048         # prompt + generated tokens per row the memory plan makes room for
DType = Literal["fp32", "bf16", "fp16"]     # compute dtypes
DTypeSetting = Literal["auto", "fp32", "bf16", "fp16"]  # auto: jobs.paging.capability.resolve_dtype
Fp16Safe = Literal["auto", "on", "off"]
VariantMode = Literal["precise", "fast", "auto"]
KvKind = Literal["fp", "int8", "fp8"]
KernelChoice = Literal["auto", "liger", "torch"]
DTYPE_NAMES: tuple[str, ...] = typing.get_args(DType)
DTYPE_SETTINGS: tuple[str, ...] = typing.get_args(DTypeSetting)
FP16_SAFE_CHOICES: tuple[str, ...] = typing.get_args(Fp16Safe)
VARIANT_MODES: tuple[str, ...] = typing.get_args(VariantMode)
KV_KINDS: tuple[str, ...] = typing.get_args(KvKind)
KERNEL_CHOICES: tuple[str, ...] = typing.get_args(KernelChoice)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """What a [models.NAME] table may set; the defaults live here and nowhere else."""
    kind: Literal["dense", "moe"] = "dense"  # dense: layer streaming; moe: expert paging
    device: str = "cpu"                    # "cpu", "cuda", "cuda:1"
    # auto: fp32 on the CPU (faster there than bf16), bf16 on CUDA from sm_80, fp16 on older cards
    dtype: DTypeSetting = "auto"
    # fp16 only: fp32 residual stream and scaled fp16 matmuls (jobs.paging.numerics); auto: on for models
    # known to overflow fp16 (Gemma); off: plain fp16 (an overflow then fails the run, never empty text)
    fp16_safe: Fp16Safe = "auto"
    vram_budget_bytes: ByteSize | None = None   # decoder layers on the device; None: all
    ram_budget_bytes: ByteSize | None = None    # host RAM cap: dense layer cache; MoE experts (pinned on CUDA)
    expert_cache_bytes: ByteSize | None = None  # MoE only: device expert cache
    # precise: the original weights; fast: the 4-bit variant of every decoder layer (dense) or
    # of the experts (moe), written by `lab-attendant model quantize NAME`; auto: dense layers by
    # policy (first/last keep_precise_layers precise, the rest fast), experts fast.
    variant: VariantMode = "precise"
    keep_precise_layers: int = 1           # auto only: layers at each end that stay precise
    kv_cache: KvKind = "fp"  # int8: HQQ 8-bit; fp8: e4m3 (speed needs Hopper+)
    kernels: KernelChoice = "auto"  # auto: Liger on CUDA when installed
    cache_policy: Literal["lru", "lfu"] = "lru"  # MoE only: which expert leaves the device cache
    # The memory plan (jobs.paging.plan.memplan) makes room for batch_size x context_tokens; a longer row is refused.
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    # Device memory the plan may use (None: what is free at load); e.g. to emulate a smaller card.
    device_memory_bytes: ByteSize | None = None
    # Sequential read bytes/s of the disk holding the weights, for the plan's disk bound (None: --disk-bandwidth,
    # else what the probe kind measured on that disk and remembered).
    disk_bytes_per_s: ByteSize | None = None

    def settings(self) -> dict[str, Any]:
        """The ModelSettings fields only (a subclass's own fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSettings)}


@dataclass(frozen=True, kw_only=True)
class ModelSpec(ModelSettings):
    """One resolved model: its [models.NAME] settings plus the name and the folder."""
    name: str                              # the [models.NAME] it was resolved from
    path: str                              # the model folder (config.json + safetensors) or a .gguf file


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything a worker needs for one run; `run_dir/spec.json` holds it as JSON."""
    version: int                           # SPEC_VERSION of the daemon that wrote it
    run_id: int
    kind: str                              # registered kind name
    module: str                            # imported by the worker
    function: str                          # called as function(params, ctx)
    params: dict[str, Any]                 # validated by jobs.contract.kinds.validate_params
    needs_paging: bool
    run_dir: str
    output_dir: str                        # outputs land here, written atomically
    state_dir: str                         # what workers keep between runs: state_dir/worker
    models_dir: str
    logs_dir: str
    heartbeat_interval_s: float            # [worker] heartbeat_interval_s
    model: ModelSpec | None = None         # kinds with a `model` param only
    # [paths] allowed_roots (resolved): every file a job reads must lie under one (jobs.contract.confine);
    # none = nothing may be read from params.
    allowed_roots: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Parse a spec file; SpecError names the first unknown, missing or mistyped key."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError("spec must be a JSON object")
        if data.get("version") != SPEC_VERSION:
            raise SpecError(f"spec version {data.get('version')!r} is not {SPEC_VERSION}: the "
                            "daemon and the worker come from different lab-attendant versions; "
                            "restart the daemon after an upgrade")
        return Reader("spec", SpecError).build(cls, data)

    @classmethod
    def read(cls, path: Path) -> RunSpec:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
        return cls.from_json(text)
