"""What would make a planned run faster, each with the bound it gives: a 4-bit GGUF of the same model, a
RAM budget that keeps every streamed byte in memory, a larger batch (stdlib only, used by memplan)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from jobs.contract.units import format_size
from jobs.paging.plan.memplan import MemoryPlan, PlanRequest, plan_only
from jobs.paging.plan.profiles import DeviceProfile
from jobs.paging.plan.shape import ModelShape

Q4_BITS_PER_WEIGHT = 4.5     # Q4_0 and Q4_K both store 4.5 bits per weight (scales included)
MAX_BATCH = 256


def four_bit_shape(shape: ModelShape) -> ModelShape:
    """The same model as a Q4 GGUF (4.5 bits per weight in the decoder, embeddings as Q4 too)."""
    def q4(numel: int) -> int:
        return math.ceil(numel * Q4_BITS_PER_WEIGHT / 8)
    decoder = shape.decoder_numel or shape.num_layers * shape.layer_numel
    return replace(shape, weights_format="gguf", layer_stored_bytes=q4(shape.layer_numel),
                   decoder_stored_bytes=q4(decoder), non_layer_stored_bytes=q4(shape.non_layer_numel),
                   expert_stored_bytes=q4(shape.expert_numel), bytes_by_block_type=(),
                   source="estimate: 4.5 bits per weight")


def _bits_per_weight(shape: ModelShape) -> float:
    numel = shape.decoder_numel or shape.num_layers * shape.layer_numel
    stored = shape.decoder_stored_bytes if shape.gguf else numel * shape.stored_bytes
    return 8 * stored / max(1, numel)


def faster_options(shape: ModelShape, device: DeviceProfile, req: PlanRequest, plan: MemoryPlan) -> list[dict[str, Any]]:
    """Each option: what to change, the bytes per pass it gives, and its tokens/s bound (None: none known)."""
    out: list[dict[str, Any]] = []

    def option(what: str, trial: MemoryPlan) -> None:
        out.append({"what": what, "fits": trial.fits, "bytes_per_pass": trial.bytes_per_pass,
                    "disk_bytes_per_pass": trial.disk_bytes_per_pass, "from_disk": trial.from_disk,
                    "bound_tokens_per_s": trial.bound_tokens_per_s})

    if _bits_per_weight(shape) > Q4_BITS_PER_WEIGHT + 1:
        option(f"a 4-bit GGUF of the same model (Q4_0/Q4_K_M, ~{Q4_BITS_PER_WEIGHT} bits per weight: "
               "lab-attendant model add NAME FILE.gguf)", plan_only(four_bit_shape(shape), device, req, ""))
    if plan.from_disk and plan.disk_bytes_per_pass:
        need = plan.disk_bytes_per_pass + (plan.host_ram_bytes if device.kind == "cuda" else plan.peak_device_bytes)
        trial = plan_only(shape, replace(device, host_ram_bytes=max(need, device.host_ram_bytes or 0)), req, "")
        option(f"{format_size(need)} of free host RAM, so the {format_size(plan.disk_bytes_per_pass)} read per "
               "pass stay in the page cache (--host-ram to plan for it)", trial)
    if plan.fits and plan.bytes_per_pass and req.batch < MAX_BATCH:
        low, high = req.batch, MAX_BATCH + 1        # the largest batch that fits at this context
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if plan_only(shape, device, replace(req, batch=mid), "").fits else (low, mid)
        if low > req.batch:
            option(f"batch {low} at {req.context} tokens (the largest that fits)",
                   plan_only(shape, device, replace(req, batch=low), ""))
    return out
