"""The GPU's copy path run on CPU through the thread engine (jobs.paging.copy_engine): the dense slot ring, staging
ring and RAM-cache arena on a tiny Gemma-3, the expert cache and staging slots on a tiny Mixtral. Logits equal the
resident model under random delays, every wait is reached, and dropping any one of them makes the checker fail."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from engine_helpers import PROMPTS, dequantized_reference, resident_logits
from moe_helpers import expert_bytes, prompts, save_hf, tiny_mixtral
from test_gguf_moe import IDS, QWEN3, expert_slice_bytes, write_moe_gguf
from test_gguf_stream import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from jobs.paging import quant
from jobs.paging.copy_engine import WAITS, CopyOrderError, ThreadEngine
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.moe.load import load_paged_moe
from jobs.paging.open import spec_for
from jobs.paging.plan.expert_budget import slot_bytes
from jobs.paging.plan.shape import shape_from_path

pytestmark = pytest.mark.engine

# Each wait, and the first race the checker must report without it.
DENSE_WAITS = {
    "slot ready": r"^compute stream reads \('(resident layer|slot)', \d\) while side stream 1's write",
    "slot freed": r"^side stream 1 writes \('slot', \d\) while compute stream's read",
    "staging copied": r"^host thread \S+ writes \('staging', \d\) while side stream 1's read",
    "slot ring close": r"^host thread MainThread frees \('(slot|staging)', \d\) while side stream 1's",
    "resident record_stream": r"^compute stream reads \('resident layer', \d\), allocated on side stream 1's pool, "
                              "without record_stream",
}
MOE_WAITS = {
    "expert ready": r"^compute stream reads \('expert slot', \d+\) while side stream 1's write",
    "expert slot freed": r"^side stream 1 writes \('expert slot', \d+\) while compute stream's read",
    "expert staging copied": r"^host thread MainThread writes \('expert staging', \d\) while side stream 1's read",
    "expert cache close": r"^host thread MainThread frees \('expert slot', \d+\) while (side|compute) stream",
    "expert store close": r"^host thread MainThread frees \('expert (staging|in RAM)', .*\) while side stream 1's read",
}
UNCHECKED = {"stall timing"}  # orders no buffer: a timing event read before it fired raises on its own


def test_every_wait_has_a_mutation_test():
    assert set(DENSE_WAITS) | set(MOE_WAITS) | UNCHECKED == set(WAITS)


# -- dense: tiny Gemma-3, 5 layers: 2 resident, 2 streaming slots (1 without prefetch), 1 streamed layer in RAM --
@pytest.fixture(scope="module")
def gemma(tiny_dirs):
    folder = tiny_dirs["gemma3"]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, ref


def run_dense(folder, engine: ThreadEngine, *, prefetch: bool = True) -> tuple[list[torch.Tensor], dict]:
    layer_bytes = max(ModelStore(folder).layer_nbytes_as(torch.float32))
    spec = spec_for(folder, dtype="fp32", vram_budget_bytes=4 * layer_bytes, ram_budget_bytes=layer_bytes)
    try:
        with load_streamed(spec, prefetch=prefetch, engine=engine) as streamed:
            # Two passes: every slot and staging buffer is reused, the cached layer comes from the arena.
            logits = [resident_logits(streamed.model, streamed.tokenizer, PROMPTS[:3]) for _ in range(2)]
            stats = streamed.stats()
    finally:
        engine.close()
    return logits, stats


@pytest.mark.parametrize("prefetch", [True, False])
def test_dense_streaming_through_threads_equals_resident(gemma, prefetch):
    folder, ref = gemma
    engine = ThreadEngine(seed=1, max_delay_s=0.002)
    logits, stats = run_dense(folder, engine, prefetch=prefetch)
    # Without prefetch the plan streams through one slot, so one more layer is resident.
    slots = 2 if prefetch else 1
    assert (stats["resident_layers"], stats["streamed_layers"], stats["streaming_slots"]) == (4 - slots, 1 + slots,
                                                                                              slots)
    assert stats["ram_cache_layers"] == 1 and stats["prefetch"] == prefetch
    expected = resident_logits(ref, AutoTokenizer.from_pretrained(folder), PROMPTS[:3])
    for got in logits:
        assert (got - expected).abs().max().item() <= 1e-5
    assert {w for w in DENSE_WAITS if engine.waits[w]} == set(DENSE_WAITS) and engine.violations == []


@pytest.mark.parametrize("dropped", DENSE_WAITS)
def test_dense_checker_sees_each_dropped_wait(gemma, dropped):
    folder, _ = gemma
    engine = ThreadEngine(seed=2, skip=[dropped])
    with pytest.raises(CopyOrderError):
        run_dense(folder, engine)
    assert re.search(DENSE_WAITS[dropped], engine.violations[0]), engine.violations[0]


@pytest.mark.parametrize("ram_layers", [0, 1])
def test_fast_layers_expand_on_the_side_stream_and_equal_their_dequantized_weights(tiny_dirs, tmp_path, ram_layers):
    """Every layer fast (4-bit): a resident one expands on the side stream into its own tensors, a streamed one
    inside its slot, both after the packed parts' copy, from staging or (ram_layers 1) the cache arena."""
    folder = tmp_path / "gemma3"
    shutil.copytree(tiny_dirs["gemma3"], folder)
    spec = quant.QuantSpec(4, 64)
    quant.write_variant(folder, spec)
    ref = dequantized_reference(folder, spec)
    layer_bytes = max(ModelStore(folder).layer_nbytes_as(torch.float32))
    engine = ThreadEngine(seed=5, max_delay_s=0.002)
    try:
        with load_streamed(spec_for(folder, dtype="fp32", variant="fast", vram_budget_bytes=3 * layer_bytes,
                                    ram_budget_bytes=ram_layers * layer_bytes), engine=engine) as fast:
            expected = resident_logits(ref, fast.tokenizer, PROMPTS[:3])
            for _ in range(2):
                assert (resident_logits(fast.model, fast.tokenizer, PROMPTS[:3]) - expected).abs().max() <= 1e-4
            stats = fast.stats()
    finally:
        engine.close()
    assert stats["variants"] == "FFFFF" and stats["resident_layers"] >= 1 and stats["streamed_layers"] >= 2
    assert (stats["ram_cache_layers"] > 0) == (ram_layers > 0) and engine.violations == []


@pytest.mark.parametrize("ram_bytes", [None, 1 << 30])
def test_gguf_blocks_cross_through_the_staging_ring_and_cache_arena(tmp_path, ram_bytes):
    """A GGUF layer's raw blocks are what crosses: staging ring or (ram_bytes) the RAM-cache arena -> slot."""
    path = write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", seed=5)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    layer = shape_from_path(path).layer_stored_bytes
    ids = torch.tensor([[2, 5, 9, 14, 3, 20, 7, 11, 29, 4], [2, 8, 8, 15, 22, 6, 30, 12, 9, 3]])
    engine = ThreadEngine(seed=6, max_delay_s=0.002)
    try:
        with load_streamed(spec_for(path, vram_budget_bytes=2 * layer + layer // 2, ram_budget_bytes=ram_bytes),
                           engine=engine) as loaded, torch.no_grad():
            want = reference(input_ids=ids).logits
            for _ in range(2):
                torch.testing.assert_close(loaded.model(input_ids=ids).logits, want, rtol=0, atol=1e-4)
            stats = loaded.stats()
    finally:
        engine.close()
    assert stats["resident_layers"] == 0 and (stats["ram_cache_layers"] > 0) == (ram_bytes is not None)
    assert engine.waits["staging copied"] + engine.waits["slot freed"] > 0 and engine.violations == []


# -- MoE: tiny Mixtral, 3 layers x 8 experts; 4 cache slots, 6 experts in RAM, the rest through the staging ring -
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    folder = save_hf(tiny_mixtral(), tmp_path_factory.mktemp("mixtral"))
    return folder, MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def run_moe(folder, ref, engine: ThreadEngine, *, store_first: bool = False,
            with_stats: bool = True) -> tuple[list[torch.Tensor], dict]:
    """Two passes; then close as PagedMoE does (pager, cache, store), or the store before the cache: its close must
    be safe on its own, not only after the cache's has synchronized the side stream. stats() waits on the host for
    every stall it times, which can order the side stream's last copies before close by chance (when each was
    still running as the compute stream came to it): `with_stats=False` leaves close its own wait to make."""
    size = expert_bytes(ref)
    spec = spec_for(folder, expert_cache_bytes=4 * size, ram_budget_bytes=8 * size)
    ids = prompts(2, 12)
    try:
        paged = load_paged_moe(spec, engine=engine)
        try:
            with torch.no_grad():
                logits = [paged.model(ids).logits for _ in range(2)]
            stats = paged.stats() if with_stats else {}
        finally:
            if store_first:
                paged.pager.close()
                paged.store.close()
                paged.cache.close()
            else:
                paged.close()
    finally:
        engine.close()
    return logits, stats


@pytest.mark.parametrize("store_first", [False, True])
def test_expert_paging_through_threads_equals_resident(mixtral, store_first):
    folder, ref = mixtral
    engine = ThreadEngine(seed=3, max_delay_s=0.002)
    logits, stats = run_moe(folder, ref, engine, store_first=store_first)
    with torch.no_grad():
        expected = ref(prompts(2, 12)).logits
    for got in logits:
        assert (got - expected).abs().max().item() <= 1e-5
    assert stats["evictions"] > 0 and stats["disk_reads"] > 2  # slots reused, the staging ring came round
    assert {w for w in MOE_WAITS if engine.waits[w]} == set(MOE_WAITS) and engine.violations == []


@pytest.mark.parametrize("dropped", MOE_WAITS)
def test_moe_checker_sees_each_dropped_wait(mixtral, dropped):
    folder, ref = mixtral
    engine = ThreadEngine(seed=4, skip=[dropped])
    with pytest.raises(CopyOrderError):
        run_moe(folder, ref, engine, store_first=dropped == "expert store close", with_stats=False)
    assert re.search(MOE_WAITS[dropped], engine.violations[0]), engine.violations[0]


def test_gguf_experts_page_through_threads_equal_transformers(tmp_path):
    """A Qwen3-MoE GGUF: experts are their slices of the file's blocks, in RAM or read through the staging ring."""
    path = write_moe_gguf(tmp_path / "tiny-qwen3moe.gguf", QWEN3)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    slot = max(expert_slice_bytes(path).values())
    engine = ThreadEngine(seed=7, max_delay_s=0.002)
    try:
        # 5 cache slots; 3 experts in RAM plus the 2 staging slots: most are read on demand
        spec = spec_for(path, expert_cache_bytes=5 * slot, ram_budget_bytes=(3 + 2) * slot_bytes(slot))
        with load_paged_moe(spec, engine=engine) as paged, torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(paged.model(input_ids=IDS).logits, reference(input_ids=IDS).logits,
                                           rtol=0, atol=1e-4)
            stats = paged.stats()
    finally:
        engine.close()
    assert stats["experts_in_ram"] == 3 and stats["disk_reads"] > 2 and stats["evictions"] > 0
    assert {w for w in MOE_WAITS if engine.waits[w]} == set(MOE_WAITS) and engine.violations == []


# -- the checker itself, on bare buffers ------------------------------------------------------------------------
def test_a_read_after_a_waited_copy_passes_and_names_the_buffer_when_not():
    engine = ThreadEngine()
    side, compute = engine.new_stream(), engine.compute_stream()
    src, dst = torch.arange(4.0), torch.zeros(4)
    engine.host_writes(["staging 0"])
    engine.run(side, lambda: dst.copy_(src), reads=["staging 0"], writes=["slot 0"])
    with pytest.raises(CopyOrderError, match=r"compute stream reads 'slot 0' while side stream 1's write"):
        engine.reads(compute, ["slot 0"])
    engine.wait(compute, engine.record(side), "slot ready")
    engine.reads(compute, ["slot 0"])
    assert torch.equal(dst, src)  # the wait really waited for the worker's copy
    with pytest.raises(CopyOrderError, match=r"host thread MainThread writes 'staging 0'"):
        engine.host_writes(["staging 0"])
    engine.close()


def test_unknown_wait_names_are_refused():
    with pytest.raises(ValueError, match="unknown wait"):
        ThreadEngine(skip=["slot redy"])
