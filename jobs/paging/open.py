"""The one way into the engine: `open_model(ModelSpec)` hands a dense model to layer streaming and a MoE
model to the expert pager with every setting it honours, and refuses one it cannot (stdlib at import)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.errors import SettingError
from jobs.spec import DEFAULT_BATCH_SIZE, ModelSettings, ModelSpec

# What each engine has no use for, and why: refused unless left at its default. ram_budget_bytes applies
# to both: dense caches streamed layers in it, the expert pager holds at most that much of its experts in
# host RAM (pinned on CUDA) and reads the rest from the checkpoint on demand.
_IGNORED_BY = {
    "dense": (("expert_cache_bytes", "cache_policy"),
              "layer streaming has no experts to cache; its device budget is vram_budget_bytes"),
    "moe": (("vram_budget_bytes", "keep_precise_layers", "fp16_safe"),
            "the expert pager keeps every non-expert weight on the device and budgets only the experts "
            "(expert_cache_bytes); it streams no decoder layers, keeps none precise and has no fp16-safe path "
            "(a non-finite value still fails the run)"),
}


def is_moe_folder(model_dir: str | Path) -> bool:
    """True when the folder's config.json names routed experts (`num_local_experts`: Mixtral, gpt-oss;
    `num_experts`: Qwen-MoE, OLMoE; `n_routed_experts`: DeepSeek), top level or text_config."""
    from jobs.paging.moe_families import num_routed_experts

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the dense engine says what is wrong with the folder
    return bool(num_routed_experts(config) or num_routed_experts(config.get("text_config") or {}))


def check_settings(spec: ModelSpec) -> None:
    """SettingError naming every setting of `spec` that its kind's engine would have to ignore."""
    names, why = _IGNORED_BY[spec.kind]
    default = ModelSettings()
    ignored = [f"{n} = {getattr(spec, n)!r}" for n in names if getattr(spec, n) != getattr(default, n)]
    if ignored:
        raise SettingError(f"model '{spec.name}' is {spec.kind} and cannot honour {', '.join(ignored)}: {why}; "
                           f"remove {'it' if len(ignored) == 1 else 'them'} from [models.{spec.name}] "
                           "(or drop the matching command-line flag)")


def open_model(spec: ModelSpec, *, prefetch: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
    """The loaded model (layer_stream.StreamedModel or moe.PagedMoE; see generate.LoadedModel).

    prefetch: read the next layer (dense) or the predicted experts (moe) while the current one computes.
    batch_size x spec.context_tokens is what the memory plan makes room for; a plan that cannot fit the
    device is refused (BudgetError naming what would fit) before any weight is read.
    """
    check_settings(spec)
    if spec.kind == "moe":
        from jobs.paging.moe import load_paged_moe

        _check_moe_plan(spec, batch_size)

        return load_paged_moe(spec.path, device=spec.device, dtype=spec.dtype,
                              expert_cache_bytes=spec.expert_cache_bytes, cache_policy=spec.cache_policy,
                              ram_budget_bytes=spec.ram_budget_bytes, prefetch=prefetch, variant=spec.variant,
                              kernels=spec.kernels)
    from jobs.paging.layer_stream import load_streamed

    return load_streamed(spec.path, device=spec.device, dtype=spec.dtype, vram_budget_bytes=spec.vram_budget_bytes,
                         ram_budget_bytes=spec.ram_budget_bytes, prefetch=prefetch, variant=spec.variant,
                         keep_precise=spec.keep_precise_layers, kernels=spec.kernels, fp16_safe=spec.fp16_safe,
                         batch_size=batch_size, context_tokens=spec.context_tokens, kv_cache=spec.kv_cache,
                         device_memory_bytes=spec.device_memory_bytes)


def _check_moe_plan(spec: ModelSpec, batch_size: int) -> None:
    """The expert pager's plan against the real device, before load_paged_moe reads a byte."""
    import torch

    from jobs.errors import BudgetError
    from jobs.paging.capability import resolve_dtype
    from jobs.paging.memplan import PlanRequest, make_plan
    from jobs.paging.runtime import runtime_profile
    from jobs.paging.shape import shape_from_folder

    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return  # load_paged_moe says so
    plan = make_plan(shape_from_folder(spec.path), runtime_profile(device, spec.device_memory_bytes),
                     PlanRequest.for_model(spec, batch=batch_size, dtype=resolve_dtype(spec.dtype, device)),
                     spec.name)
    if not plan.fits:
        raise BudgetError(f"model {spec.name}: {plan.reason}")
