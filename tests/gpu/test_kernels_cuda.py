"""On CUDA with liger-kernel installed: the Liger-patched streamed Gemma gives the unpatched logits (bf16).

Skipped without CUDA or without `pip install liger-kernel`; run with: venvs/experimental/bin/python -m pytest tests/gpu
"""
from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
from engine_helpers import PROMPTS, find_test_model  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")


def _logits(loaded) -> torch.Tensor:
    tok = loaded.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to(loaded.device)
    with torch.no_grad():
        return loaded.model(**enc).logits.float()


def test_liger_streamed_gemma_matches_torch_kernels_in_bf16():
    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.dense.model_store import ModelStore
    from jobs.paging.open import spec_for

    gemma_dir = find_test_model()
    # Four layers' worth on the device: the rest stream, so patched norms see swapped weights every pass.
    budget = 4 * max(ModelStore(gemma_dir).layer_nbytes_as(torch.bfloat16))
    # The torch run comes first: Liger's RoPE stays patched for CUDA tensors process-wide once applied.
    with load_streamed(spec_for(gemma_dir, device="cuda", dtype="bf16", vram_budget_bytes=budget,
                                kernels="torch")) as plain:
        want = _logits(plain)
    with load_streamed(spec_for(gemma_dir, device="cuda", dtype="bf16", vram_budget_bytes=budget,
                                kernels="liger")) as patched:
        stats = patched.stats()
        got = _logits(patched)
        assert "forward" in vars(patched.model.model.norm)  # the instance really carries Liger's forward
    assert stats["kernels"] == "liger" and stats["streamed_layers"] > 0
    # bf16 keeps 8 bits of mantissa: fused kernels that round in a different order move logits by a few
    # units in the last place of values ~30, i.e. well under 3 % of the spread; a wrong norm offset or
    # a stale weight moves them by the spread itself.
    spread = want.abs().max()
    assert (got - want).abs().max() <= 0.03 * spread
    assert (got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).float().mean() >= 0.75
    # Liger's class and RoPE patches did not leak: a CPU model built afterwards runs plain torch.
    with load_streamed(spec_for(gemma_dir, device="cpu", dtype="fp32")) as cpu:
        assert cpu.stats()["kernels_reason"] == "cpu"
        assert torch.isfinite(_logits(cpu)).all()
