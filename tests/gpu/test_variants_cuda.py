"""On CUDA, fast layers cross as 4-bit parts and are expanded on the device: same logits as the CPU fast path.

Skipped without CUDA; run on a GPU machine with: venvs/experimental/bin/python -m pytest tests/gpu
"""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from engine_helpers import PROMPTS, find_test_model  # noqa: E402


@pytest.fixture(scope="module")
def gemma_q4() -> Path:
    from jobs.paging import quant

    model_dir = find_test_model()
    quant.write_variant(model_dir, quant.QuantSpec(4, 64), device="cuda")  # no-op when already written
    return model_dir


def _logits(streamed):
    tok = streamed.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(streamed.device)
    with torch.no_grad():
        return streamed.model(**enc).logits.float().cpu()


@pytest.mark.parametrize("ram_budget_layers", [0, 100])
def test_cuda_fast_layers_match_cpu_fast_path(gemma_q4, ram_budget_layers):
    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.dense.model_store import ModelStore
    from jobs.paging.generate import generate
    from jobs.paging.open import spec_for

    layer_bytes = max(ModelStore(gemma_q4).layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(gemma_q4, device="cpu", dtype="fp32", variant="fast")) as cpu:
        expected = _logits(cpu)
        expected_text = [o.token_ids for o in generate(cpu, PROMPTS, max_new_tokens=16, batch_size=4).outputs]
    with load_streamed(spec_for(gemma_q4, device="cuda", dtype="fp32", variant="fast", vram_budget_bytes=4 * layer_bytes,
                                ram_budget_bytes=ram_budget_layers * layer_bytes)) as gpu:
        for _ in range(2):  # the second pass comes from the pinned RAM cache when there is one
            assert (_logits(gpu) - expected).abs().max().item() <= 1e-3
        got = [o.token_ids for o in generate(gpu, PROMPTS, max_new_tokens=16, batch_size=4).outputs]
        stats = gpu.stats()
        cache = list(gpu._streamer._ram_cache.values())
    # Same weights after dequantizing on either device; fp32 matmuls on GPU (TF32 off by default) stay close.
    for row, expected_row in zip(got, expected_text):
        assert row[:8] == expected_row[:8]
    assert stats["variants"] == "F" * 18 and stats["max_materialized_layers"] <= 4
    assert all(t.is_pinned() for layer in cache for t in layer.values())
    assert all(any(t.dtype == torch.uint8 for t in layer.values()) for layer in cache)


def test_cuda_fast_pass_copies_packed_bytes(gemma_q4):
    """One pass with every layer streamed copies exactly the packed parts (plus fp32 norms) to the device."""
    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.dense.model_store import ModelStore
    from jobs.paging.open import spec_for

    store = ModelStore(gemma_q4)
    store.open_variant()
    layer_bytes = max(store.layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(gemma_q4, device="cuda", dtype="fp32", variant="fast",
                                vram_budget_bytes=layer_bytes), prefetch=False) as gpu:
        enc = gpu.tokenizer(PROMPTS[:1], return_tensors="pt").to("cuda")
        with torch.no_grad():
            gpu.model(**enc)
            before = gpu.stats()["bytes_h2d"]
            gpu.model(**enc)
        copied = gpu.stats()["bytes_h2d"] - before
    assert copied == sum(store.layer_nbytes_fast_as(torch.float32))
    assert copied < 0.2 * sum(store.layer_nbytes_as(torch.float32))  # 4.5 bits of 32 per weight, plus norms
