"""4-bit experts on CUDA: uint8 slots, pinned 4-bit host buffers, dequantized on the device, same
logits as the CPU 4-bit pager. Skipped without CUDA; tests/engine/test_moe_quant.py checks the rest."""
from __future__ import annotations

import pytest
import torch
from moe_helpers import prompts, save_hf, tiny_mixtral  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from jobs.paging.quant import QuantSpec, write_variant

    folder = save_hf(tiny_mixtral(), tmp_path_factory.mktemp("mixtral"))
    write_variant(folder, QuantSpec(4, 16))
    return folder


@pytest.mark.parametrize("n_cached,in_ram", [(2, None), (5, None), (24, None), (3, 8)])
def test_cuda_4bit_matches_cpu_4bit(folder, n_cached, in_ram):
    """in_ram None: every expert in the pinned arena; 8: the other 16 staged from the variant's mmap."""
    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    cpu = load_paged_moe(spec_for(folder, variant="fast"))
    eb = cpu.store.expert_bytes
    budget = None if in_ram is None else (in_ram + 2) * (-(-eb // 64) * 64)
    # fp32 as on the CPU: "auto" is bf16 on a bf16 card
    gpu = load_paged_moe(spec_for(folder, device="cuda", dtype="fp32", variant="fast",
                                  expert_cache_bytes=n_cached * eb, ram_budget_bytes=budget))
    assert gpu.store.buffer((0, 0)).is_pinned() and gpu.store.buffer((0, 0)).dtype == torch.uint8
    assert gpu.stats()["host_pinned_bytes"] == gpu.stats()["host_ram_bytes"] <= (budget or float("inf"))
    assert gpu.stats()["experts_from_disk"] == (0 if in_ram is None else 24 - in_ram)
    assert gpu.cache._slots.is_cuda and gpu.cache._slots.dtype == torch.uint8
    assert gpu.cache.allocated_bytes == n_cached * eb
    ids = prompts(3, 12)
    with torch.no_grad():
        want = cpu.model(ids).logits
        for _ in range(2):
            got = gpu.model(ids.cuda()).logits.cpu()
            # same dequantized weights; only the order of fp32 reductions differs between devices
            assert (got - want).abs().max().item() <= 1e-4
    s = gpu.stats()
    assert s["expert_variant"] == "q4g16" and s["bytes_h2d"] == (s["misses"] + s["prefetches"]) * eb
    gpu.close()
    cpu.close()


def test_cuda_4bit_bf16_and_cpu_miss_exec(folder):
    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    kw = dict(device="cuda", dtype="bf16", variant="fast")
    eb = load_paged_moe(spec_for(folder, variant="fast")).store.expert_bytes
    off = load_paged_moe(spec_for(folder, expert_cache_bytes=2 * eb, **kw), prefetch=False)
    on = load_paged_moe(spec_for(folder, expert_cache_bytes=2 * eb, **kw), prefetch=False, cpu_miss_exec=True)
    ids = prompts(1, 6).cuda()
    with torch.no_grad():
        a, b = off.model(ids[:, :1]).logits.float(), on.model(ids[:, :1]).logits.float()
    # bf16 on two devices: a few bf16 ulps of logits of magnitude ~1
    assert (a - b).abs().max().item() <= 3e-2
    assert on.stats()["cpu_execs"] > 0
    out = off.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)


def test_write_variant_quantizes_on_cuda(tmp_path):
    """HQQ on the GPU writes the same format (parts land on the host) with a 4-bit-sized error:
    every expert matrix within 10 % relative error (q4g16 on CPU: at most ~6 %)."""
    from safetensors import safe_open

    from jobs.paging.quant import QuantSpec, Variant, dequantize_weight, write_variant

    folder = save_hf(tiny_mixtral(), tmp_path / "m")
    write_variant(folder, QuantSpec(4, 16), device="cuda")
    variant = Variant.open(folder)
    experts = [k for k in variant.shapes if ".experts." in k]
    assert len(experts) == 3 * 8 * 3
    with safe_open(folder / "model.safetensors", framework="pt") as original:
        for key in experts:
            with safe_open(variant.file_of[key], framework="pt") as f:
                parts = {p.rsplit(".", 1)[1]: f.get_tensor(p) for p in variant.part_keys(key)}
            assert parts["W_q"].device.type == "cpu"
            w = original.get_tensor(key).float()
            deq = dequantize_weight(parts, variant.shapes[key], variant.spec, torch.float32)
            assert 0 < ((deq - w).norm() / w.norm()).item() < 0.10
