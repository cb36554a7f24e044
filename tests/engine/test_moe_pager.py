"""ExpertPager at the seam: same output as transformers' MixtralExperts, hits used first."""
from __future__ import annotations

import pytest
import torch
from moe_helpers import expert_bytes, save_hf, tiny_mixtral

from jobs.paging.moe.load import load_paged_moe
from jobs.paging.open import spec_for

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory):
    model = tiny_mixtral(seed=3)
    return model, save_hf(model, tmp_path_factory.mktemp("mixtral"))


def routing(n_tokens: int, experts: list[list[int]]):
    index = torch.tensor(experts)
    weights = torch.softmax(torch.randn(n_tokens, index.shape[1]), dim=-1)
    return index, weights


@pytest.mark.parametrize("n_cached", [1, 3])
def test_layer_output_equals_transformers_experts(model_and_folder, n_cached):
    model, folder = model_and_folder
    paged = load_paged_moe(spec_for(folder, expert_cache_bytes=n_cached * expert_bytes(model)), prefetch=False)
    torch.manual_seed(0)
    hidden = torch.randn(5, model.config.hidden_size)
    index, weights = routing(5, [[0, 7], [3, 0], [7, 6], [1, 2], [6, 3]])
    with torch.no_grad():
        want = model.model.layers[1].mlp.experts(hidden, index, weights)
        got = paged.model.model.layers[1].mlp.experts(hidden, index, weights)
    assert (want - got).abs().max().item() <= 1e-6
    assert paged.stats()["misses"] == 6


def test_resident_experts_run_before_misses_evict_them(model_and_folder):
    model, folder = model_and_folder
    paged = load_paged_moe(spec_for(folder, expert_cache_bytes=expert_bytes(model)), prefetch=False)
    hidden = torch.randn(1, model.config.hidden_size)
    experts = paged.model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts(hidden, *routing(1, [[5, 6]]))   # 6 ends resident in the only slot
        experts(hidden, *routing(1, [[2, 6]]))   # 6 first (hit), then 2 evicts it
    s = paged.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 3, 2)
