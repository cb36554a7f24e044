"""The expert pager sizes its device cache from the memory plan (memplan), the same plan that refuses a run."""
from __future__ import annotations

import pytest
import torch
from moe_helpers import save_hf, tiny_mixtral

from jobs.paging.moe.load import load_paged_moe
from jobs.paging.open import spec_for
from jobs.paging.plan.memplan import MemoryPlan, PlanRequest, make_plan
from jobs.paging.plan.shape import shape_from_folder
from jobs.paging.runtime import runtime_profile

pytestmark = pytest.mark.engine

CONTEXT_TOKENS = 2048


def _plan(folder, cap_bytes: int, batch: int) -> MemoryPlan:
    spec = spec_for(folder, device_memory_bytes=cap_bytes, context_tokens=CONTEXT_TOKENS)
    return make_plan(shape_from_folder(folder), runtime_profile(torch.device("cpu"), cap_bytes),
                     PlanRequest.for_model(spec, batch=batch, dtype="fp32", prefetch=True), spec.name)


def _smallest_cap_bytes(folder, batch: int, slots: int) -> int:
    """The least device memory at which the plan at `batch` x 2048 tokens fits `slots` experts."""
    lo, hi = 1, 64 * 1024**3
    while lo < hi:
        mid = (lo + hi) // 2
        plan = _plan(folder, mid, batch)
        if plan.fits and plan.expert_cache_slots >= slots:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_the_expert_cache_holds_the_plans_experts_at_batch_8_and_batch_1(tmp_path):
    """Device memory capped so that batch 8 x 2048 leaves room for 3 of the 24 experts: the loader takes
    those 3 (it took every expert before, the plan computed and dropped), and at batch 1 the plan's larger
    count; the same device memory, so only the KV cache and activations of the batch differ."""
    folder = save_hf(tiny_mixtral(), tmp_path / "mix")
    cap_bytes = _smallest_cap_bytes(folder, batch=8, slots=3)
    at_8, at_1 = _plan(folder, cap_bytes, 8), _plan(folder, cap_bytes, 1)
    assert at_8.expert_cache_slots == 3 and at_1.expert_cache_slots > 3
    for batch, plan in ((8, at_8), (1, at_1)):
        spec = spec_for(folder, device_memory_bytes=cap_bytes, context_tokens=CONTEXT_TOKENS)
        with load_paged_moe(spec, batch_size=batch, prefetch=False) as paged:
            stats = paged.stats()
            assert stats["capacity_experts"] == plan.expert_cache_slots, batch
            assert stats["plan_expert_cache_slots"] == plan.expert_cache_slots
            assert paged.cache.allocated_bytes == plan.expert_cache_slots * paged.store.expert_bytes
            ids = torch.tensor([[1, 5, 9, 13]])
            with torch.no_grad():
                assert torch.isfinite(paged.model(ids).logits).all()
