"""On CUDA, pinned host buffers and the side-stream copies give the resident model's logits and text.

Skipped without CUDA; run on a GPU machine with: venvs/experimental/bin/python -m pytest tests/gpu
"""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from engine_helpers import PROMPTS, find_test_model  # noqa: E402


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return find_test_model()


@pytest.mark.parametrize("ram_budget_layers", [0, 100])
def test_cuda_stream_matches_resident(gemma_dir, ram_budget_layers):
    from transformers import AutoModelForCausalLM

    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.dense.model_store import ModelStore
    from jobs.paging.generate import generate
    from jobs.paging.open import spec_for

    layer_bytes = max(ModelStore(gemma_dir).layer_nbytes_as(torch.float32))
    ref = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).to("cuda").eval()
    with load_streamed(spec_for(gemma_dir, device="cuda", dtype="fp32", vram_budget_bytes=4 * layer_bytes,
                                ram_budget_bytes=ram_budget_layers * layer_bytes)) as streamed:
        tok = streamed.tokenizer
        tok.padding_side = "left"
        enc = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            diff = (streamed.model(**enc).logits - ref(**enc).logits).abs().max().item()
        assert diff <= 1e-4
        got = generate(streamed, PROMPTS, max_new_tokens=32, batch_size=4)
        with torch.no_grad():
            out = ref.generate(**enc, max_new_tokens=32, do_sample=False)
        expected = out[:, enc["input_ids"].shape[1]:].tolist()
        for row, completion in zip(expected, got.outputs):
            assert completion.token_ids == row[:len(completion.token_ids)]
        stats = streamed.stats()
        assert stats["bytes_h2d"] > 0 and stats["max_materialized_layers"] <= 4
        assert all(p.is_pinned() for layer in streamed._streamer._ram_cache.values() for p in layer.values())
