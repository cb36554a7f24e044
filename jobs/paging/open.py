"""The one way into the engine: `open_model(ModelSpec)` hands a dense model to layer streaming and a MoE
model to the expert pager with every setting it honours, and refuses one it cannot (plan.settings)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.contract.spec import DEFAULT_BATCH_SIZE, ModelSpec
from jobs.paging.plan.settings import check_settings, is_moe_folder

if TYPE_CHECKING:
    from jobs.paging.generate import LoadedModel


def spec_for(model_dir: str | Path, **settings: Any) -> ModelSpec:
    """The ModelSpec of a bare folder (name: its basename; kind: moe when config.json names experts) with
    `settings` (ModelSettings fields) over the defaults: what tests, benchmarks and the engine's command
    line hand the loaders where no [models.NAME] table exists."""
    kind = "moe" if is_moe_folder(model_dir) else "dense"
    return ModelSpec(name=Path(model_dir).name, path=str(model_dir), **{"kind": kind, **settings})


def open_model(spec: ModelSpec, *, prefetch: bool = True, batch_size: int = DEFAULT_BATCH_SIZE) -> LoadedModel:
    """The loaded model (layer_stream.StreamedModel or moe.PagedMoE; see generate.LoadedModel).

    prefetch: read the next layer (dense) or the predicted experts (moe) while the current one computes.
    batch_size x spec.context_tokens is what the memory plan makes room for; a plan that cannot fit the
    device is refused (BudgetError naming what would fit) before any weight is read.
    """
    check_settings(spec)
    import torch

    from jobs.paging.runtime import configure_cuda_allocator

    configure_cuda_allocator(torch.device(spec.device))   # before any CUDA allocation of the run
    if spec.kind == "moe":
        from jobs.paging.moe.load import load_paged_moe

        return load_paged_moe(spec, prefetch=prefetch, batch_size=batch_size)
    from jobs.paging.dense.layer_stream import load_streamed

    return load_streamed(spec, prefetch=prefetch, batch_size=batch_size)

