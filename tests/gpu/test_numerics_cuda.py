"""On a real card: dtype auto follows the card (fp16 + the fp16-safe path below sm_80, bf16 from it), Gemma in
fp16 with the safe path agrees with fp32, and without it fails with NonFiniteError, never a device-side assert.

Skipped without CUDA; run on a GPU machine with: venvs/experimental/bin/python -m pytest tests/gpu
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from engine_helpers import find_test_model  # noqa: E402

HIDDEN_PROMPTS = ["The largest planet in our solar system is", "To make a good cup of tea, you first",
                  "In 1969, the first humans to walk on the Moon"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_dir():
    return find_test_model()


def test_auto_follows_the_card(gemma_dir):
    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.open import spec_for

    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    with load_streamed(spec_for(gemma_dir, device="cuda")) as loaded:
        stats = loaded.stats()
    assert (stats["dtype"], stats["fp16_safe"]) == (("bf16", False) if native_bf16 else ("fp16", True))


def test_fp16_safe_matches_fp32_and_unsafe_fails(gemma_dir):
    from jobs.contract.errors import NonFiniteError
    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.dense.model_store import ModelStore
    from jobs.paging.generate import Sampling, generate
    from jobs.paging.open import spec_for

    def run(loaded, sampling=Sampling()):
        return generate(loaded, HIDDEN_PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=3, sampling=sampling)

    with load_streamed(spec_for(gemma_dir, device="cuda", dtype="fp32")) as loaded:
        reference = [o.token_ids for o in run(loaded).outputs]
    # A streamed budget (4 layers) so layers cross as stored (bf16) and convert on the card.
    layer_bytes = max(ModelStore(gemma_dir).layer_nbytes_as(torch.float16))
    with load_streamed(spec_for(gemma_dir, device="cuda", dtype="fp16", vram_budget_bytes=4 * layer_bytes)) as loaded:
        outputs = run(loaded).outputs
    assert all(o.text.strip() for o in outputs)
    assert sum(o.token_ids == ref for o, ref in zip(outputs, reference)) >= 2
    with load_streamed(spec_for(gemma_dir, device="cuda", dtype="fp16", fp16_safe="off")) as loaded:
        for sampling in (Sampling(), Sampling(greedy=False, temperature=0.7)):  # multinomial never sees NaN
            with pytest.raises(NonFiniteError, match="decoder layer .* in fp16"):
                run(loaded, sampling)
        torch.cuda.synchronize()  # a device-side assert would surface here
