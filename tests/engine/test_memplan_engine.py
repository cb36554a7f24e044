"""The memory plan against transformers' own classes, and the streaming slots that make it hold: the ring
bounds what the prefetch can keep alive, the device cap refuses before a weight is read, and a pass that
raised gives its slots back."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import PROMPTS
from transformers import AutoConfig, AutoModelForCausalLM, MixtralForCausalLM

from jobs.contract.errors import BudgetError
from jobs.paging.copy_engine import ThreadEngine
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.dense.slots import SlotRing
from jobs.paging.generate import generate
from jobs.paging.open import spec_for
from jobs.paging.pinned import HostArena, pinned_alloc_bytes
from jobs.paging.plan.shape import shape_from_config, shape_from_folder

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def _layer_numel(layer, skip: str = "\0") -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if skip not in n)


def test_formulas_match_transformers_gemma3_27b_on_meta():
    config = AutoConfig.from_pretrained(ROOT / "examples/configs/gemma-3-27b-it").get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_folder(ROOT / "examples/configs/gemma-3-27b-it")
    layers = model.get_decoder().layers
    assert max(_layer_numel(layer) for layer in layers) == shape.layer_numel
    in_layers = {id(p) for p in layers.parameters()}
    assert sum(p.numel() for p in model.parameters() if id(p) not in in_layers) == shape.non_layer_numel
    assert tuple(config.layer_types) == shape.layer_types


def test_formulas_match_transformers_mixtral_8x7b_on_meta():
    config = AutoConfig.from_pretrained(ROOT / "examples/configs/mixtral-8x7b-v0.1")
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    shape = shape_from_folder(ROOT / "examples/configs/mixtral-8x7b-v0.1")
    layer = model.model.layers[0]
    assert _layer_numel(layer, skip="experts") == shape.layer_numel
    experts = sum(p.numel() for n, p in layer.named_parameters() if "experts" in n)
    assert experts == shape.num_experts * shape.expert_numel
    assert pinned_alloc_bytes(shape.expert_numel * 2) == 512 * 1024**2   # what per-expert pinning took


def test_headers_and_formulas_agree_on_the_embedded_gemma(gemma_dir):
    import json
    by_config = shape_from_config(json.loads((gemma_dir / "config.json").read_text()))
    by_headers = shape_from_folder(gemma_dir)
    assert by_headers.source == "safetensors headers"
    assert (by_headers.layer_numel, by_headers.non_layer_numel) == (by_config.layer_numel, by_config.non_layer_numel)


def test_slot_ring_blocks_the_prefetch_until_the_compute_frees_a_slot():
    engine = ThreadEngine()
    ring = SlotRing(2, 1024, torch.device("cpu"), engine=engine)
    compute, side = engine.compute_stream(), engine.new_stream()
    a, b = ring.acquire(), ring.acquire()
    got = []
    third = threading.Thread(target=lambda: got.append(ring.acquire()))
    third.start()
    third.join(0.3)
    assert third.is_alive() and not got          # a third layer cannot land while two are alive
    ring.release(a, compute)                       # the compute stream's "free" event for slot a
    third.join(5)
    assert got == [a] and ring.max_in_use == 2
    ring.before_copy_in(a, side)                   # the side stream waits for that event before copying
    assert engine.waits == {"slot freed": 1}
    ring.after_copy_in(a, side)
    ring.before_copy_in(a, side)                   # reusing the staging buffer waits for the copy out of it
    assert engine.waits == {"slot freed": 1, "staging copied": 1}
    ring.release(b, compute)
    ring.close()
    engine.close()


def test_prefetch_never_holds_more_than_the_planned_slots(tiny_dirs):
    model_dir = tiny_dirs["llama"]
    layer = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    # 1 resident + 2 slots, every streamed layer cached in RAM: reads are free, so the host could run ahead
    with load_streamed(spec_for(model_dir, dtype="fp32", vram_budget_bytes=3 * layer,
                                ram_budget_bytes=100 * layer)) as sm:
        assert sm.stats()["streaming_slots"] == 2
        in_use = []
        for lay in sm.model.get_decoder().layers:
            def slow(module, args, output):
                in_use.append(sm._streamer._ring.in_use)
                time.sleep(0.01)                    # compute slower than a (cached) read
            lay.register_forward_hook(slow)
        generate(sm, PROMPTS[:2], max_new_tokens=3)
        stats = sm.stats()
    assert stats["max_slots_in_use"] == 2 and max(in_use) <= 2
    assert stats["ram_cache_layers"] == stats["streamed_layers"]


def test_a_device_too_small_is_refused_before_any_weight_is_read(tiny_dirs, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the plan was checked")
    monkeypatch.setattr(ModelStore, "_read", no_reads)
    with pytest.raises(BudgetError, match="what fits instead|does not fit"):
        load_streamed(spec_for(tiny_dirs["llama"], dtype="fp32", device_memory_bytes=200_000, context_tokens=4096),
                      batch_size=8)


def test_a_pass_that_raised_gives_its_slots_back(tiny_dirs):
    model_dir = tiny_dirs["qwen2"]
    layer = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(model_dir, dtype="fp32", vram_budget_bytes=3 * layer)) as sm:
        boom = {"left": 1}

        def fail_once(module, args):
            if boom["left"]:
                boom["left"] -= 1
                raise RuntimeError("injected")
        handle = sm.model.get_decoder().layers[2].register_forward_pre_hook(fail_once)
        with pytest.raises(RuntimeError, match="injected"):
            generate(sm, PROMPTS[:1], max_new_tokens=2)
        handle.remove()
        done = []
        worker = threading.Thread(target=lambda: done.append(generate(sm, PROMPTS[:1], max_new_tokens=2)))
        worker.start()
        worker.join(60)
        assert done, "the next pass deadlocked waiting for a slot"


def test_a_batch_fits_when_its_memory_fits_not_each_dimension(tiny_dirs):
    """The plan reserves KV cache + activations for batch x context; a batch with more rows but fewer tokens
    that needs less runs (bench/stream_bench.py's 16 x 46 under a plan for 8 x 2048), one that needs more is
    refused with both figures."""
    with load_streamed(spec_for(tiny_dirs["llama"], dtype="fp32", context_tokens=64), batch_size=2) as sm:
        assert sm.plan.batch_fits(4, 8) and not sm.plan.batch_fits(2, 65 * 4)
        more_rows = ["a", "b", "c", "d"]
        out = generate(sm, more_rows, max_new_tokens=2, batch_size=4)
        assert out.batch_sizes == [4] and len(out.outputs) == 4
        with pytest.raises(BudgetError, match=r"a batch of 1 rows x \d+ tokens .* needs .* more than the memory "
                                              r"plan reserved for 2 x 64"):
            generate(sm, ["a long prompt " * 60], max_new_tokens=4)


def test_host_arena_carves_exact_aligned_views():
    arena = HostArena(1000, pin=False)
    a, b = arena.take(10), arena.take(100)
    assert arena.nbytes == 1024 and arena.pinned_bytes == 0
    assert (b.data_ptr() - a.data_ptr()) == 64 and arena.free_bytes == 1024 - 64 - 128
    with pytest.raises(MemoryError):
        arena.take(2000)


def test_a_failed_pin_is_an_oom_with_its_numbers():
    from jobs.contract.oom import oom_details, oom_kind
    from jobs.paging.pinned import pinned_error

    exc = pinned_error("RAM cache", 8 * 1024**3, "cudaHostRegister: out of memory")
    assert isinstance(exc, MemoryError)
    assert oom_kind(exc) == "pinned_host"
    assert oom_details(exc)["requested_bytes"] == 8 * 1024**3


def test_the_runtime_device_is_the_free_memory_cuda_reports(monkeypatch):
    """Injected CUDA numbers (no GPU here): the plan sees mem_get_info's free bytes, capped by
    device_memory_bytes, and refuses the 27B at batch 8 x 4096 on a 2080 Ti's worth of free memory."""
    from jobs.paging.plan.memplan import PlanRequest, make_plan
    from jobs.paging.runtime import runtime_profile

    free = int(10.36 * 1024**3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 11 * 1024**3))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 2080 Ti")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    device = runtime_profile(torch.device("cuda"))
    assert (device.kind, device.memory_bytes, device.context_bytes, device.capability) == ("cuda", free, 0, (7, 5))
    assert runtime_profile(torch.device("cuda"), device_memory_bytes=4 * 1024**3).memory_bytes == 4 * 1024**3
    shape = shape_from_folder(ROOT / "examples/configs/gemma-3-27b-it")
    assert make_plan(shape, device, PlanRequest(batch=1, context=2048, fp16_safe=True)).fits
    refused = make_plan(shape, device, PlanRequest(batch=8, context=4096, fp16_safe=True))
    assert not refused.fits and "what fits instead" in refused.reason
