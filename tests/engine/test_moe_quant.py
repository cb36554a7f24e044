"""4-bit (HQQ) experts in the expert pager: same math as transformers on the dequantized weights,
bounded distance from the precise model, and cache byte accounting in 4-bit bytes."""
from __future__ import annotations

import math

import pytest
import torch
from moe_helpers import TINY, dequantized_experts, expert_bytes, prompts, reference, save_fused, save_hf, tiny_mixtral

from jobs.contract.errors import ModelFolderError
from jobs.paging.moe.load import load_paged_moe
from jobs.paging.moe.store import expert_nbytes
from jobs.paging.open import spec_for
from jobs.paging.quant import QuantSpec, write_variant

pytestmark = pytest.mark.engine

SPEC = QuantSpec(4, 16)  # divides TINY's hidden 48 and intermediate 64
N_EXPERTS = TINY["num_hidden_layers"] * TINY["num_local_experts"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same tiny Mixtral in both checkpoint layouts, each with its q4g16 variant."""
    model = tiny_mixtral()
    out = {}
    for name, save in (("per_expert", save_hf), ("fused", save_fused)):
        folder = save(model, tmp_path_factory.mktemp(name))
        write_variant(folder, SPEC)
        out[name] = folder
    return out


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("n_cached,cpu_exec", [(2, False), (5, True), (N_EXPERTS, False)])
def test_logits_equal_transformers_on_dequantized_weights(folders, layout, n_cached, cpu_exec):
    """Same weights, same math: the paged 4-bit model is transformers' model whose experts hold
    the dequantized weights, to fp32 rounding (the 1e-5 of the precise pager's tests)."""
    folder = folders[layout]
    ref = reference(folder, dequantized_experts(folder))
    paged = load_paged_moe(spec_for(folder, variant="fast", expert_cache_bytes=n_cached * SPEC_EXPERT_BYTES),
                           cpu_miss_exec=cpu_exec)
    ids = prompts(3, 12)
    with torch.no_grad():
        for _ in range(2):  # a second pass runs from a warm cache
            assert (paged.model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
    s = paged.stats()
    assert (s["expert_variant"], s["expert_bits"]) == ("q4g16", 4)
    assert s["cpu_execs"] > 0 if cpu_exec else s["cpu_execs"] == 0
    paged.close()


def test_logits_close_to_precise_within_quantization_bound(folders):
    """How far 4-bit experts may move the logits, derived from the measured weight error.

    e_w = the largest relative (Frobenius) error ||W - deq(W)|| / ||W|| over every expert matrix.
    An expert is W2 (silu(W1 x) * W3 x); to first order each of its three matrices contributes a
    relative output error of about e_w, so with independent errors the expert output is off by
    about sqrt(3) e_w. Each of the L MoE blocks adds its error to the residual stream, and at
    most these add up: logits (final norm and lm_head are precise) are off by at most
    B = L * sqrt(3) * e_w relatively. With q4g16 e_w is ~6 %, so B ~ 0.31 for 3 layers; a model
    with its experts' gate and up halves swapped (a layout bug) is off by more than B, which is
    checked below so the bound is known to reject a wrong model.
    """
    folder = folders["per_expert"]
    precise = reference(folder)
    experts = dequantized_experts(folder)
    e_w = 0.0
    for (layer, e), (gate_up, down) in experts.items():
        mod = precise.model.layers[layer].mlp.experts
        e_w = max(e_w, rel_err(gate_up, mod.gate_up_proj[e].detach()),
                  rel_err(down, mod.down_proj[e].detach()))
    bound = TINY["num_hidden_layers"] * math.sqrt(3) * e_w
    paged = load_paged_moe(spec_for(folder, variant="fast", expert_cache_bytes=5 * SPEC_EXPERT_BYTES))
    ids = prompts(4, 16)
    with torch.no_grad():
        exact = precise(ids).logits
        approx = paged.model(ids).logits
        err = rel_err(approx, exact)
        top1 = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
        inter = TINY["intermediate_size"]
        swapped = reference(folder, {k: (torch.cat([g[inter:], g[:inter]]), d)
                                     for k, (g, d) in experts.items()})
        wrong = rel_err(swapped(ids).logits, exact)
    print(f"\nq4g16: weight error e_w={e_w:.4f}, logits error {err:.4f}, bound {bound:.4f}, "
          f"swapped-layout model {wrong:.4f}")
    assert 0.01 < e_w < 0.15  # 4-bit with fp16 group scales: a few per cent, never exact
    assert 0 < err <= bound < wrong

    # The random tiny model's logits are nearly flat, so top-1 flips where two tokens are close:
    # 0.875 of the 64 positions agree (q4g16, seed 0); greedy decoding diverges after the first
    # flip, so it is reported, not asserted.
    assert top1 >= 0.75
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = precise.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1]:]
        b = paged.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[:, ids.shape[1]:]
    same = (a == b).float().mean().item()
    first = (a[:, 0] == b[:, 0]).float().mean().item()
    print(f"top-1 agreement {top1:.0%} of 64 positions; greedy: {same:.0%} of 4x24 tokens "
          f"identical, first token identical in {first:.0%} of rows")
    paged.close()


SPEC_EXPERT_BYTES = (2 * SPEC.nbytes((TINY["intermediate_size"], TINY["hidden_size"]))
                     + SPEC.nbytes((TINY["hidden_size"], TINY["intermediate_size"])))


@pytest.mark.parametrize("group_size,shape", [(16, {}), (64, dict(hidden_size=64, intermediate_size=128))])
def test_byte_accounting_uses_4bit_size(tmp_path, group_size, shape):
    """expert_bytes, the host buffers, the slots and bytes_h2d per miss are the 4-bit size:
    (4 + 32/g) / 16 of bf16 (codes plus an fp16 scale and zero per group of g)."""
    model = tiny_mixtral(**shape)
    folder = save_hf(model, tmp_path / "m")
    spec = QuantSpec(4, group_size)
    write_variant(folder, spec)
    c = model.config
    want = 2 * spec.nbytes((c.intermediate_size, c.hidden_size)) + spec.nbytes((c.hidden_size, c.intermediate_size))
    bf16 = expert_nbytes(c, torch.bfloat16)
    assert want * 16 == bf16 * (4 + 32 / group_size)  # 6/16 for g16, 4.5/16 for g64
    budget = 4 * want + want // 2
    paged = load_paged_moe(spec_for(folder, variant="fast", expert_cache_bytes=budget), prefetch=False)
    assert paged.store.expert_bytes == want
    assert paged.store.buffer((1, 3)).dtype == torch.uint8 and paged.store.buffer((1, 3)).numel() == want
    assert paged.store.total_bytes == N_EXPERTS * want
    assert paged.cache.capacity == 4 and paged.cache.allocated_bytes == 4 * want
    with torch.no_grad():
        paged.model(prompts(2, 8, vocab=c.vocab_size))
    s = paged.stats()
    assert s["misses"] > 0 and s["bytes_h2d"] == s["misses"] * want
    assert s["expert_bytes"] == want and s["expert_variant"] == spec.name
    paged.close()


def test_budget_for_n_4bit_experts_holds_n(folders):
    """A budget of N 4-bit experts (plus change) holds N of them; in bf16 the same bytes hold
    fewer than half as many."""
    n = 7
    budget = n * SPEC_EXPERT_BYTES + SPEC_EXPERT_BYTES - 1
    paged = load_paged_moe(spec_for(folders["per_expert"], variant="fast", expert_cache_bytes=budget))
    with torch.no_grad():
        paged.model.generate(prompts(2, 8), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert len(paged.cache.resident_keys()) == n
    assert paged.stats()["resident_bytes"] == n * SPEC_EXPERT_BYTES <= budget
    paged.close()
    precise = load_paged_moe(spec_for(folders["per_expert"], dtype="bf16", expert_cache_bytes=budget))
    assert precise.cache.capacity == budget // expert_bytes(tiny_mixtral(), 2) < n / 2
    precise.close()


def test_missing_or_incomplete_variant_says_what_to_do(tmp_path):
    folder = save_hf(tiny_mixtral(), tmp_path / "m")
    with pytest.raises(ModelFolderError, match=r"lab-attendant model quantize NAME --bits 4.*jobs.paging.quant"):
        load_paged_moe(spec_for(folder, variant="fast"))
    auto = load_paged_moe(spec_for(folder, variant="auto"))
    assert auto.stats()["expert_variant"] == "precise" and auto.stats()["expert_bits"] == 32
    auto.close()
    with pytest.raises(ValueError, match="unknown variant"):
        load_paged_moe(spec_for(folder, variant="4bit"))
    # group 32 divides intermediate 64 (w2) but not hidden 48 (w1, w3): those stay precise
    write_variant(folder, QuantSpec(4, 32))
    with pytest.raises(ModelFolderError, match="no complete quantized weights.*--group-size"):
        load_paged_moe(spec_for(folder, variant="fast"))
