"""Expert paging on CUDA: pinned host store (one registered arena), side-stream copies, experts past the
RAM budget staged from disk through pinned slots, same logits as transformers.

Skipped without CUDA; the CPU suite in tests/engine checks the same bookkeeping.
"""
from __future__ import annotations

import pytest
import torch
from moe_helpers import expert_bytes, prompts, save_hf, tiny_mixtral  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf(tiny_mixtral(), tmp_path_factory.mktemp("mixtral"))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("n_cached", [1, 2, 5, 24])
def test_cuda_logits_match_transformers(folder, policy, n_cached):
    from transformers import MixtralForCausalLM

    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    ref = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    # fp32 explicitly: dtype "auto" is bf16 on a card with native bf16, and the reference is fp32
    paged = load_paged_moe(spec_for(folder, device="cuda", dtype="fp32",
                                    expert_cache_bytes=n_cached * expert_bytes(ref), cache_policy=policy))
    assert paged.store.buffer((0, 0)).is_pinned()  # no ram_budget_bytes: every tiny expert fits half of RAM
    assert paged.stats()["host_pinned_bytes"] == paged.stats()["host_ram_bytes"] > 0
    assert paged.stats()["experts_from_disk"] == 0
    assert paged.cache._stream is not None and paged.cache._slots.is_cuda
    ids = prompts(3, 16).cuda()
    with torch.no_grad():
        for _ in range(2):
            diff = (paged.model(ids).logits - ref(ids).logits).abs().max().item()
            assert diff <= 1e-5
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(paged.model.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))
    s = paged.stats()
    assert s["resident_bytes"] <= s["expert_cache_bytes"]
    assert torch.cuda.memory_allocated() > 0
    paged.close()


def test_cuda_cpu_miss_exec_same_logits(folder):
    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    ids = prompts(1, 6).cuda()
    kw = dict(device="cuda", dtype="fp32", expert_cache_bytes=2 * expert_bytes(tiny_mixtral()))
    off = load_paged_moe(spec_for(folder, **kw), prefetch=False)
    on = load_paged_moe(spec_for(folder, **kw), prefetch=False, cpu_miss_exec=True)
    with torch.no_grad():
        out_on = on.model(ids[:, :1]).logits
        out_off = off.model(ids[:, :1]).logits
    assert (out_on - out_off).abs().max().item() <= 1e-5
    assert on.stats()["cpu_execs"] > 0


def test_cuda_bf16_prefetch_reports(folder):
    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    paged = load_paged_moe(spec_for(folder, device="cuda", dtype="bf16",
                                    expert_cache_bytes=6 * expert_bytes(tiny_mixtral(), 2)))
    ids = prompts(1, 8).cuda()
    paged.model.generate(ids, max_new_tokens=16, do_sample=False)
    s = paged.stats()
    assert s["prefetches"] > 0 and s["stall_s"] >= 0 and s["bytes_h2d"] > 0


def staged_budget(eb: int, in_ram: int) -> int:
    """ram_budget_bytes holding `in_ram` experts plus the 2 staging slots (64-byte aligned in the arena)."""
    return (in_ram + 2) * (-(-eb // 64) * 64)


@pytest.mark.parametrize("in_ram", [0, 8])
@pytest.mark.parametrize("cpu_exec", [False, True])
def test_cuda_ram_budget_stages_from_disk(folder, in_ram, cpu_exec):
    """Past the RAM budget every expert is read from the mmap into a pinned staging slot and copied to the
    device on the side stream; a slot is refilled only after the copy out of it completed (a race would
    change the logits). in_ram 0: every copy goes through the 2-slot ring."""
    from transformers import MixtralForCausalLM

    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    ref = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    eb = expert_bytes(ref)
    budget = staged_budget(eb, in_ram)
    paged = load_paged_moe(spec_for(folder, device="cuda", dtype="fp32", ram_budget_bytes=budget,
                                    expert_cache_bytes=3 * eb), cpu_miss_exec=cpu_exec, cpu_miss_max_tokens=2)
    s = paged.stats()
    assert s["host_pinned_bytes"] == s["host_ram_bytes"] == budget  # one registration, exact bytes
    assert (s["experts_in_ram"], s["experts_from_disk"], s["staging_slots"]) == (in_ram, 24 - in_ram, 2)
    assert all(slot.is_pinned() for slot in paged.store._staging)
    if in_ram:
        assert paged.store.buffer((0, 0)).is_pinned()
    ids = prompts(3, 16).cuda()
    with torch.no_grad():
        for _ in range(2):
            assert (paged.model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(paged.model.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))
    s = paged.stats()
    assert s["disk_reads"] > 0 and s["disk_read_bytes"] == s["disk_reads"] * eb
    assert (s["cpu_execs"] > 0) == cpu_exec
    paged.close()
