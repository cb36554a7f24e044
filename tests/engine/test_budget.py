"""Budgets bound what is materialized: resident layers + 2 streaming slots, checked two ways."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from engine_helpers import PROMPTS
from jobs.paging.generate import generate
from jobs.errors import BudgetError
from jobs.paging.layer_stream import load_streamed
from jobs.paging.model_store import ModelStore

pytestmark = pytest.mark.engine
RESIDENT = 2


def test_two_resident_layers_never_more_than_four_materialized(tiny_dirs):
    model_dir = tiny_dirs["llama"]
    layer_bytes = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    with load_streamed(model_dir, dtype="fp32", vram_budget_bytes=(RESIDENT + 2) * layer_bytes) as streamed:
        assert streamed.stats()["resident_layers"] == RESIDENT
        store = streamed._store
        alive: dict[int, list[weakref.ref]] = {}
        read_layer = store.read_layer

        def spy_read_layer(index, dtype, **kwargs):
            tensors = read_layer(index, dtype, **kwargs)
            alive.setdefault(index, []).extend(weakref.ref(t) for t in tensors.values())
            return tensors

        store.read_layer = spy_read_layer
        peaks = []

        def count_alive(module, args):
            gc.collect()
            peaks.append(sum(any(r() is not None for r in refs) for refs in alive.values()))

        layers = streamed.model.get_decoder().layers
        for layer in layers:
            layer.register_forward_pre_hook(count_alive)  # runs after the engine's own pre-hook
        generate(streamed, PROMPTS[:2], max_new_tokens=4)

        stats = streamed.stats()
        assert stats["passes"] >= 2
        assert stats["max_materialized_layers"] <= RESIDENT + 2
        assert peaks and max(peaks) <= RESIDENT + 2
        # Streamed layers were read every pass, so their old tensors really were released.
        assert len(alive) == len(layers)
        assert len(alive[len(layers) - 1]) >= 2 * len(store.layer_entries[-1])
        gc.collect()
        still_alive = [i for i, refs in alive.items() if any(r() is not None for r in refs)]
        assert len(still_alive) <= RESIDENT + 2
        assert set(range(RESIDENT)) <= set(still_alive)


def test_ram_cache_avoids_rereading(tiny_dirs):
    model_dir = tiny_dirs["qwen2"]
    sizes = ModelStore(model_dir).layer_nbytes_as(torch.float32)
    budget = 3 * max(sizes)  # one resident layer, two streaming slots
    with load_streamed(model_dir, dtype="fp32", vram_budget_bytes=budget, ram_budget_bytes=10 * max(sizes)) as sm:
        sm.model(**sm.tokenizer(["hello"], return_tensors="pt"))
        after_first = sm.stats()["bytes_read"]
        sm.model(**sm.tokenizer(["hello"], return_tensors="pt"))
        stats = sm.stats()
    assert stats["ram_cache_layers"] == stats["streamed_layers"]
    assert stats["bytes_read"] == after_first  # second pass came from RAM


def test_budget_below_one_layer_fails_before_reading(tiny_dirs):
    layer_bytes = max(ModelStore(tiny_dirs["llama"]).layer_nbytes_as(torch.float32))
    with pytest.raises(BudgetError, match=f"cannot hold one decoder layer .* give at least {layer_bytes} bytes"):
        load_streamed(tiny_dirs["llama"], dtype="fp32", vram_budget_bytes=layer_bytes - 1)
