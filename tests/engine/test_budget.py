"""Budgets bound what is materialized: resident layers + 2 streaming slots, checked two ways."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import PROMPTS

from jobs.contract.errors import BudgetError
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.generate import generate
from jobs.paging.open import spec_for

pytestmark = pytest.mark.engine
RESIDENT = 2


def test_two_resident_layers_never_more_than_four_materialized(tiny_dirs):
    model_dir = tiny_dirs["llama"]
    layer_bytes = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(model_dir, dtype="fp32", vram_budget_bytes=(RESIDENT + 2) * layer_bytes)) as streamed:
        assert streamed.stats()["resident_layers"] == RESIDENT
        store, ring = streamed._store, streamed._streamer._ring
        allocated, read_into = [], []
        read_layer, read_layer_into = store.read_layer, store.read_layer_into

        def spy_read_layer(index, dtype, **kwargs):
            allocated.append(index)
            return read_layer(index, dtype, **kwargs)

        def spy_read_layer_into(index, out, **kwargs):
            read_into.append(index)
            return read_layer_into(index, out, **kwargs)

        store.read_layer, store.read_layer_into = spy_read_layer, spy_read_layer_into
        slots = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in ring.device_buffers]
        outside = []

        def in_a_slot(module, args):  # runs after the engine's own pre-hook has placed the layer
            for p in module.parameters():
                if not any(lo <= p.data_ptr() < hi for lo, hi in slots):
                    outside.append(p.shape)

        layers = streamed.model.get_decoder().layers
        for layer in layers[RESIDENT:]:
            layer.register_forward_pre_hook(in_a_slot)
        generate(streamed, PROMPTS[:2], max_new_tokens=4)

        stats = streamed.stats()
        assert stats["passes"] >= 2
        assert stats["max_materialized_layers"] <= RESIDENT + 2
        assert stats["max_slots_in_use"] <= 2 and len(ring.device_buffers) == 2
        # Streamed layers were read every pass, straight into the two slot buffers, never into new tensors.
        assert not outside
        assert set(allocated) <= set(range(RESIDENT))
        streamed_layers = range(RESIDENT, len(layers))
        assert all(read_into.count(i) >= stats["passes"] for i in streamed_layers)


def test_ram_cache_avoids_rereading(tiny_dirs):
    model_dir = tiny_dirs["qwen2"]
    sizes = ModelStore(model_dir).layer_nbytes_as(torch.float32)
    budget = 3 * max(sizes)  # one resident layer, two streaming slots
    with load_streamed(spec_for(model_dir, dtype="fp32", vram_budget_bytes=budget,
                                ram_budget_bytes=10 * max(sizes))) as sm:
        sm.model(**sm.tokenizer(["hello"], return_tensors="pt"))
        after_first = sm.stats()["bytes_read"]
        sm.model(**sm.tokenizer(["hello"], return_tensors="pt"))
        stats = sm.stats()
    assert stats["ram_cache_layers"] == stats["streamed_layers"]
    assert stats["bytes_read"] == after_first  # second pass came from RAM


def test_budget_below_one_layer_fails_before_reading(tiny_dirs):
    layer_bytes = max(ModelStore(tiny_dirs["llama"]).layer_nbytes_as(torch.float32))
    with pytest.raises(BudgetError, match=f"cannot hold one decoder layer .* give at least {layer_bytes} bytes"):
        load_streamed(spec_for(tiny_dirs["llama"], dtype="fp32", vram_budget_bytes=layer_bytes - 1))
