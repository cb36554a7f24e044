"""The one way into the engine: `open_model(ModelSpec)` hands a dense model to layer streaming and a MoE
model to the expert pager with every setting it honours, and refuses one it cannot (plan.settings)."""
from __future__ import annotations

from typing import Any

from jobs.contract.spec import DEFAULT_BATCH_SIZE, ModelSpec
from jobs.paging.plan.settings import check_settings


def open_model(spec: ModelSpec, *, prefetch: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
    """The loaded model (layer_stream.StreamedModel or moe.PagedMoE; see generate.LoadedModel).

    prefetch: read the next layer (dense) or the predicted experts (moe) while the current one computes.
    batch_size x spec.context_tokens is what the memory plan makes room for; a plan that cannot fit the
    device is refused (BudgetError naming what would fit) before any weight is read.
    """
    check_settings(spec)
    if spec.kind == "moe":
        from jobs.paging.moe.load import load_paged_moe

        _check_moe_plan(spec, batch_size)

        return load_paged_moe(spec.path, device=spec.device, dtype=spec.dtype,
                              expert_cache_bytes=spec.expert_cache_bytes, cache_policy=spec.cache_policy,
                              ram_budget_bytes=spec.ram_budget_bytes, prefetch=prefetch, variant=spec.variant,
                              kernels=spec.kernels)
    from jobs.paging.dense.layer_stream import load_streamed

    return load_streamed(spec.path, device=spec.device, dtype=spec.dtype, vram_budget_bytes=spec.vram_budget_bytes,
                         ram_budget_bytes=spec.ram_budget_bytes, prefetch=prefetch, variant=spec.variant,
                         keep_precise=spec.keep_precise_layers, kernels=spec.kernels, fp16_safe=spec.fp16_safe,
                         batch_size=batch_size, context_tokens=spec.context_tokens, kv_cache=spec.kv_cache,
                         device_memory_bytes=spec.device_memory_bytes)


def _check_moe_plan(spec: ModelSpec, batch_size: int) -> None:
    """The expert pager's plan against the real device, before load_paged_moe reads a byte."""
    import torch

    from jobs.contract.errors import BudgetError
    from jobs.paging.capability import resolve_dtype
    from jobs.paging.plan.memplan import PlanRequest, make_plan
    from jobs.paging.plan.shape import shape_from_folder
    from jobs.paging.runtime import runtime_profile

    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return  # load_paged_moe says so
    plan = make_plan(shape_from_folder(spec.path), runtime_profile(device, spec.device_memory_bytes),
                     PlanRequest.for_model(spec, batch=batch_size, dtype=resolve_dtype(spec.dtype, device)),
                     spec.name)
    if not plan.fits:
        raise BudgetError(f"model {spec.name}: {plan.reason}")
