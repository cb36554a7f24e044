"""ExpertCache bookkeeping on scripted routing traces: hits, misses, evictions, byte budget."""
from __future__ import annotations

import random

import pytest
import torch
from moe_helpers import save_hf, tiny_mixtral

from jobs.contract.errors import BudgetError
from jobs.paging.moe.cache import ExpertCache
from jobs.paging.moe.store import CheckpointIndex, ExpertStore

pytestmark = pytest.mark.engine

A, B, C, D, E = (0, 0), (0, 1), (0, 2), (0, 3), (1, 0)
TRACE = [A, B, C, A, D, B, E, A, C]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = tiny_mixtral(num_hidden_layers=2, num_local_experts=4)
    folder = save_hf(model, tmp_path_factory.mktemp("tiny"))
    return ExpertStore(model.config, torch.float32).load(CheckpointIndex(folder))


def run_trace(cache: ExpertCache, trace) -> list[tuple]:
    """Demand-fetch each key in turn; return the keys evicted, in order."""
    evicted = []
    for key in trace:
        before = set(cache.resident_keys())
        cache.fetch(key)
        cache.weights(key)
        cache.release(key)
        evicted += sorted(before - set(cache.resident_keys()))
    return evicted


def test_lru_trace_matches_hand_computed(store):
    # cap 3: A B C miss; A hit; D evicts B; B evicts C; E evicts A; A evicts D; C evicts B.
    cache = ExpertCache(store, 3 * store.expert_bytes, policy="lru")
    assert run_trace(cache, TRACE) == [B, C, A, D, B]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 8, 5)
    assert set(cache.resident_keys()) == {E, A, C}
    assert s["per_layer"][1]["misses"] == 1 and s["per_layer"][0]["evictions"] == 5
    assert s["bytes_h2d"] == 8 * store.expert_bytes


def test_lfu_trace_matches_hand_computed(store):
    # Uses survive eviction; ties go to the least recent. A reaches 2 uses and stays, so the
    # 8th access (A) is a hit, and E (1 use) is evicted by C although it is more recent than B.
    cache = ExpertCache(store, 3 * store.expert_bytes, policy="lfu")
    assert run_trace(cache, TRACE) == [B, C, D, E]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (2, 7, 4)
    assert set(cache.resident_keys()) == {B, A, C}
    assert s["per_layer"][1]["evictions"] == 1


def test_prefetch_counts_only_when_used(store):
    cache = ExpertCache(store, 2 * store.expert_bytes, policy="lru")
    assert cache.fetch(A, prefetch=True) and cache.fetch(B, prefetch=True)
    cache.protect(A)
    cache.protect(B)
    assert not cache.fetch(C, prefetch=True)  # every slot protected: a prefetch gives up
    cache.release(A)
    cache.release(B)
    cache.fetch(A)  # used: a hit and a prefetch hit
    cache.fetch(C)  # evicts B, which was prefetched and never used
    s = cache.stats()
    assert (s["prefetches"], s["prefetch_hits"], s["hits"], s["misses"]) == (2, 1, 1, 1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_budget_never_exceeded_and_contents_right(store, policy, scope):
    budget = 5 * store.expert_bytes - 1  # not a multiple: the remainder must stay unused
    cache = ExpertCache(store, budget, policy=policy, scope=scope)
    rng = random.Random(7)
    keys = [(layer, e) for layer in range(2) for e in range(4)]
    for _ in range(200):
        key = rng.choice(keys)
        cache.fetch(key)
        gate_up, down = cache.weights(key)
        ref_gate_up, ref_down = store.weights(key)
        assert torch.equal(gate_up, ref_gate_up) and torch.equal(down, ref_down)
        cache.release(key)
        assert cache.resident_bytes <= budget
    assert cache.allocated_bytes <= budget
    s = cache.stats()
    assert s["hits"] + s["misses"] == 200 and s["evictions"] > 0
    if scope == "per_layer":  # 4 slots, two per layer: a layer never takes the other's slots
        assert cache.capacity == 4
        assert sum(1 for k in cache.resident_keys() if k[0] == 0) <= 2


def test_budget_below_one_expert_is_refused(store):
    with pytest.raises(BudgetError, match=str(store.expert_bytes)):
        ExpertCache(store, store.expert_bytes - 1)
    with pytest.raises(BudgetError, match="per layer"):
        ExpertCache(store, store.expert_bytes, scope="per_layer")
