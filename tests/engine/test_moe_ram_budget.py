"""The expert store's host-RAM budget: at most ram_budget_bytes of experts in one exact-size arena, the
rest read from the checkpoint through a staging ring, and the same logits and tokens as transformers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_helpers import (
    TINY,
    dequantized_experts,
    expert_bytes,
    prompts,
    reference,
    save_fused,
    save_hf,
    save_per_expert_sharded,
    tiny_mixtral,
)
from transformers import MixtralConfig, MixtralForCausalLM

from jobs.contract.errors import BudgetError
from jobs.paging.moe.load import load_paged_moe
from jobs.paging.moe.store import CheckpointIndex, ExpertStore, expert_nbytes
from jobs.paging.open import spec_for
from jobs.paging.pinned import HostArena, pinned_alloc_bytes
from jobs.paging.plan.expert_budget import (
    default_ram_budget_bytes,
    expert_host_plan,
    mem_available_bytes,
    min_ram_budget_bytes,
    resident_experts,
)
from jobs.paging.quant import QuantSpec, write_variant

pytestmark = pytest.mark.engine

GiB, MiB = 1024**3, 1024**2
N_LAYERS, N_EXPERTS = TINY["num_hidden_layers"], TINY["num_local_experts"]
ALL = N_LAYERS * N_EXPERTS
SPEC = QuantSpec(4, 16)  # divides TINY's hidden 48 and intermediate 64


def slot(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # an arena view starts on a 64-byte boundary


def third_budget(eb: int) -> int:
    """Room for a third of the experts plus the two staging slots."""
    return (ALL // 3 + 2) * slot(eb)


@pytest.fixture(scope="module")
def model():
    return tiny_mixtral()


@pytest.fixture(scope="module")
def ref(model, tmp_path_factory):
    folder = save_hf(model, tmp_path_factory.mktemp("ref"))
    return MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def quant_folder(model, tmp_path_factory):
    folder = save_hf(model, tmp_path_factory.mktemp("q"))
    write_variant(folder, SPEC)
    return folder


def test_plan_by_hand():
    # 24 experts of 1000 bytes take 1024-byte slots; the ring is 2 slots.
    assert expert_host_plan(24, 1000, None) == (24, 24 * 1024, 0)
    assert expert_host_plan(24, 1000, 24 * 1024) == (24, 24 * 1024, 0)       # all fit: no staging
    assert expert_host_plan(24, 1000, 24 * 1024 - 1) == (21, 21 * 1024, 2048)
    assert expert_host_plan(24, 1000, 10 * 1024 + 1023) == (8, 8 * 1024, 2048)
    assert expert_host_plan(24, 1000, 2048) == (0, 0, 2048)                  # every expert from disk
    assert min_ram_budget_bytes(1000) == 2048
    with pytest.raises(BudgetError, match="needs at least 2048 bytes.*at least 2048, or to 24576 "):
        expert_host_plan(24, 1000, 2047)
    # Spread over layers: expert 0 of every layer first, so each layer holds 2 or 3 of 7.
    assert resident_experts(3, 8, 7) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)]
    assert HostArena(expert_host_plan(24, 1000, 10 * 1024 + 1023).host_bytes, pin=False).nbytes == 10 * 1024


def test_plan_for_mixtral_8x7b_at_8_gib():
    """Mixtral-8x7B's real shapes in bf16: 32 layers x 8 experts x 352,321,536 bytes (336 MiB)."""
    config = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_local_experts=8)
    eb = expert_nbytes(config, torch.bfloat16)
    assert eb == 352_321_536 == 336 * MiB
    plan = expert_host_plan(32 * 8, eb, 8 * GiB)
    # (8 GiB - 2 x 336 MiB staging) // 336 MiB = 22 experts in RAM, 234 from disk
    assert plan == (22, 22 * eb, 2 * eb)
    assert plan.host_bytes == 24 * 336 * MiB == 8064 * MiB <= 8 * GiB
    # What pinning one torch buffer per expert costs instead: each rounds up to 512 MiB ...
    assert pinned_alloc_bytes(eb) == 512 * MiB
    assert 24 * pinned_alloc_bytes(eb) == 12 * GiB > 8 * GiB  # ... the same 24 buffers: 12 GiB
    assert 256 * pinned_alloc_bytes(eb) == 128 * GiB           # every expert: 128 GiB
    # No budget on CUDA: half of MemAvailable. A 32 GB host with 28 GiB available pins 14 GiB.
    assert default_ram_budget_bytes(256, eb, 28 * GiB) == 14 * GiB
    assert expert_host_plan(256, eb, 14 * GiB).experts_in_ram == 40
    assert default_ram_budget_bytes(ALL, 1000, 28 * GiB) == ALL * 1024  # everything, when it fits
    assert default_ram_budget_bytes(256, eb, None) is None


def test_plan_module_imports_without_torch():
    """The supervisor and the memory plan import expert_budget; it must not pull torch in."""
    code = "import sys, jobs.paging.plan.expert_budget; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_mem_available_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32768000 kB\nMemFree:  100 kB\nMemAvailable:   16000000 kB\n")
    assert mem_available_bytes(meminfo) == 16_000_000 * 1024
    assert mem_available_bytes(tmp_path / "missing") is None


def check_host_side(paged, budget: int, eb: int, in_ram: int) -> dict:
    s = paged.stats()
    assert s["host_ram_bytes"] == (in_ram + 2) * slot(eb) <= budget  # arena + staging, exactly
    assert s["host_pinned_bytes"] == 0  # CPU: nothing is page-locked
    assert (s["experts_in_ram"], s["experts_from_disk"], s["staging_slots"]) == (in_ram, ALL - in_ram, 2)
    assert s["ram_budget_bytes"] == budget
    held = {(layer, e) for layer in range(N_LAYERS) for e in range(N_EXPERTS) if paged.store.in_ram((layer, e))}
    assert held == set(resident_experts(N_LAYERS, N_EXPERTS, in_ram))
    assert s["disk_reads"] > 0 and s["disk_read_bytes"] == s["disk_reads"] * eb
    return s


@pytest.mark.parametrize("writer", [save_hf, save_fused, save_per_expert_sharded])
def test_third_in_ram_matches_transformers(model, ref, tmp_path, writer):
    """Room for 8 of 24 experts: logits within fp32 rounding of transformers, greedy tokens identical."""
    folder = writer(model, tmp_path / writer.__name__)
    eb = expert_bytes(model)
    budget = third_budget(eb)
    ids = prompts(3, 12)
    with load_paged_moe(spec_for(folder, ram_budget_bytes=budget, expert_cache_bytes=3 * eb)) as paged:
        with torch.no_grad():
            for _ in range(2):  # the second pass reads the same experts from disk again
                assert (paged.model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
        kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
        assert torch.equal(paged.model.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))
        s = check_host_side(paged, budget, eb, ALL // 3)
        # every copy into the device cache came from the arena or from disk, never from elsewhere
        assert s["disk_reads"] <= s["misses"] + s["prefetches"]


def test_no_expert_in_ram_with_cpu_miss_exec(model, ref, tmp_path):
    """The smallest budget (the staging ring alone): every expert, run on the host or copied to the cache,
    is read from disk, one read per miss."""
    folder = save_hf(model, tmp_path / "m")
    eb = expert_bytes(model)
    budget = min_ram_budget_bytes(eb)
    ids = prompts(1, 5)
    with load_paged_moe(spec_for(folder, ram_budget_bytes=budget, expert_cache_bytes=2 * eb), prefetch=False,
                        cpu_miss_exec=True, cpu_miss_max_tokens=2) as paged:
        with torch.no_grad():
            assert (paged.model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
        s = check_host_side(paged, budget, eb, 0)
        assert 0 < s["cpu_execs"] < s["misses"]  # both paths taken
        assert s["disk_reads"] == s["misses"] and s["bytes_h2d"] == (s["misses"] - s["cpu_execs"]) * eb
        paged.reset_stats()
        assert paged.stats()["disk_reads"] == 0


def test_bf16_from_disk_bit_identical_to_bf16_from_ram(model, tmp_path):
    """Where an expert comes from changes no bit: bf16 experts converted from the fp32 checkpoint on
    demand (no expert in RAM) give exactly the logits of the same run with every expert in RAM."""
    folder = save_fused(model, tmp_path / "m")
    eb16 = expert_bytes(model, 2)
    ids = prompts(2, 8)
    logits = {}
    for budget in (None, min_ram_budget_bytes(eb16)):
        with load_paged_moe(spec_for(folder, dtype="bf16", ram_budget_bytes=budget,
                                     expert_cache_bytes=4 * eb16)) as paged:
            with torch.no_grad():
                logits[budget] = paged.model(ids).logits
            assert paged.stats()["experts_in_ram"] == (ALL if budget is None else 0)
    assert torch.equal(*logits.values())


@pytest.mark.parametrize("cpu_exec", [False, True])
def test_4bit_third_in_ram_matches_transformers_on_dequantized(quant_folder, cpu_exec):
    """4-bit experts under the same budget rule, in 4-bit bytes: transformers' model holding the
    dequantized weights gives the same logits and greedy tokens."""
    ref = reference(quant_folder, dequantized_experts(quant_folder))
    inter, hidden = TINY["intermediate_size"], TINY["hidden_size"]
    eb = 2 * SPEC.nbytes((inter, hidden)) + SPEC.nbytes((hidden, inter))  # codes + fp16 scale, zero
    budget = third_budget(eb)
    ids = prompts(3, 12)
    with load_paged_moe(spec_for(quant_folder, variant="fast", ram_budget_bytes=budget, expert_cache_bytes=3 * eb),
                        cpu_miss_exec=cpu_exec, cpu_miss_max_tokens=2) as paged:
        with torch.no_grad():
            assert (paged.model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
        kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
        assert torch.equal(paged.model.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))
        s = check_host_side(paged, budget, eb, ALL // 3)
        assert s["expert_variant"] == SPEC.name and paged.store.slot_dtype == torch.uint8
        assert (s["cpu_execs"] > 0) == cpu_exec


def test_a_refused_pin_leaves_a_pageable_store_with_the_reason(model, tmp_path, monkeypatch):
    """cudaHostRegister refusing the arena (ulimit -l) clears CUDA's last error and leaves the store's arena
    pageable, the same bytes, with the reason (naming the bytes asked for) in its stats; it still serves."""
    folder = save_hf(model, tmp_path / "m")
    eb = expert_bytes(model)
    asked, cleared = [], []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            asked.append(nbytes)
            return 2  # cudaErrorMemoryAllocation

        def cudaGetLastError(self):
            cleared.append(True)
            return 2

    def check_error(code):
        if code:
            exc = torch.cuda.CudaError.__new__(torch.cuda.CudaError)
            RuntimeError.__init__(exc, f"out of memory ({code})")
            raise exc

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    store = ExpertStore(model.config, torch.float32, pin_memory=True)
    budget = third_budget(eb)
    store.load(CheckpointIndex(folder), ram_budget_bytes=budget)
    stats = store.stats()
    assert asked == [budget] and cleared == [True]
    assert stats["host_pinned_bytes"] == 0 and stats["host_ram_bytes"] >= budget - 64
    assert f"{budget} bytes" in stats["host_pin"] and "pageable memory instead" in stats["host_pin"]
    store.close()
