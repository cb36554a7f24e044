"""The memory plan's arithmetic on the real Gemma-3-27B and Mixtral-8x7B configs (stdlib: the supervisor
plans without torch), checked against figures computed by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.paging.plan.memplan import PlanRequest, activation_bytes, kv_cache_bytes, make_plan
from jobs.paging.plan.profiles import PROFILES, DeviceProfile, profile
from jobs.paging.plan.shape import shape_from_config, shape_from_folder

ROOT = Path(__file__).resolve().parents[2]
GEMMA_27B = ROOT / "examples/configs/gemma-3-27b-it"
MIXTRAL = ROOT / "examples/configs/mixtral-8x7b-v0.1"
GiB = 1024**3
CARD = PROFILES["rtx2080ti"]
HOST_32GB = 30 * GiB


def card() -> DeviceProfile:
    return profile("rtx2080ti", host_ram_bytes=HOST_32GB)


def test_27b_shape_by_hand():
    s = shape_from_folder(GEMMA_27B)
    assert (s.num_layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.vocab) == (62, 5376, 32, 16, 128, 262208)
    # q 5376x4096, k and v 5376x2048, o 4096x5376; MLP 3 x 5376x21504; 4 norms of 5376, q/k norms of 128
    one_layer = 5376 * (4096 + 2048 + 2048 + 4096) + 3 * 5376 * 21504 + 4 * 5376 + 2 * 128
    assert s.layer_numel == one_layer == 412_898_560
    assert s.layer_numel * 2 == 825_797_120            # "~826 MB" per layer in bf16/fp16
    assert s.tied and s.non_layer_numel == 262208 * 5376 + 5376
    assert s.non_layer_numel * 2 == 2_819_271_168      # the tied embedding, 2.63 GiB
    assert s.layer_types.count("full_attention") == 10 and s.sliding_window == 1024


def test_27b_kv_cache_by_hand():
    s = shape_from_folder(GEMMA_27B)
    per_token_layer = 2 * 16 * 128 * 2                 # K and V, 16 kv heads x 128, fp16
    # batch 1 x 2k: 10 global layers hold 2048 tokens, 52 sliding layers hold their 1024-token window
    assert kv_cache_bytes(s, 1, 2048, "fp", 2) == (10 * 2048 + 52 * 1024) * per_token_layer == 603_979_776
    assert kv_cache_bytes(s, 8, 1024, "fp", 2) == 8 * 62 * 1024 * per_token_layer
    # int8: codes plus an fp16 scale and zero per 64 channels, newest 128 tokens unquantized
    int8 = kv_cache_bytes(s, 1, 2048, "int8", 2)
    assert 0.5 * 603_979_776 < int8 < 0.6 * 603_979_776


def test_27b_at_8gib_of_layers_is_refused_naming_what_fits():
    plan = make_plan(shape_from_folder(GEMMA_27B), card(), PlanRequest(batch=8, context=1024,
                                                                       vram_budget_bytes=8 * GiB), "gemma-3-27b")
    assert not plan.fits
    assert "vram_budget_bytes 8.0 GiB of decoder layers does not fit rtx2080ti" in plan.reason
    assert "what fits instead: vram_budget_bytes <=" in plan.reason


@pytest.mark.parametrize("batch,context", [(1, 2048), (8, 1024)])
def test_27b_plan_fits_the_2080ti_by_its_own_arithmetic(batch, context):
    s = shape_from_folder(GEMMA_27B)
    plan = make_plan(s, card(), PlanRequest(batch=batch, context=context), "gemma-3-27b")
    assert plan.fits, plan.reason
    rows = {r["item"]: r["bytes"] for r in plan.rows}
    assert sum(b for r, b in zip(plan.rows, rows.values()) if r["where"] == "device") == plan.peak_device_bytes
    assert plan.peak_device_bytes <= int(10.76 * GiB)
    assert rows["embeddings, lm_head, norms"] == 2_819_271_168
    assert rows["KV cache (fp)"] == kv_cache_bytes(s, batch, context, "fp", 2)
    assert rows["streaming slots"] == 2 * 825_797_120
    assert rows["resident layers"] == plan.resident_layers * 825_797_120
    assert 0 <= plan.resident_layers < 62          # no budget means what fits, never everything
    # one more resident layer would not fit
    assert plan.peak_device_bytes + 825_797_120 * 1.05 > CARD.memory_bytes
    assert plan.bytes_per_pass == (62 - plan.resident_layers) * 825_797_120
    assert plan.bound_from_ram_tokens_per_s == pytest.approx(batch * 12e9 / plan.bytes_per_pass)
    # 47 GiB of fp16 layers per pass cannot stay in 30 GiB of host RAM: every pass reads them from disk, and
    # without a disk bandwidth the plan gives no bound rather than the PCIe one
    assert plan.from_disk and plan.disk_bytes_per_pass > plan.page_cache_bytes
    assert plan.bound_tokens_per_s is None and "come from disk" in plan.bound_note


def test_activations_count_the_math_fallbacks_scores():
    s = shape_from_folder(GEMMA_27B)
    sdpa = activation_bytes(s, PlanRequest(batch=1, context=2048), 2)
    eager = activation_bytes(s, PlanRequest(batch=1, context=2048, attention="eager"), 2)
    assert eager["scores"] == 1 * 32 * 2048**2 * (4 + 2 * 2)    # B*H*L^2 fp32 softmax + fp16 in and out
    assert sdpa["scores"] == 2048**2 * 2                       # two boolean masks (full, sliding)
    assert sdpa["mlp"] == 3 * 2048 * 21504 * 2


def test_mixtral_with_8gib_ram_pins_at_most_8gib():
    s = shape_from_folder(MIXTRAL)
    assert s.expert_numel * 2 == 352_321_536           # 3 x 4096 x 14336 x 2 B = 336 MiB per expert
    assert s.layer_numel == 4096 * (4096 + 1024 + 1024 + 4096) + 2 * 4096 + 4096 * 8
    plan = make_plan(s, card(), PlanRequest(batch=1, context=2048, ram_budget_bytes=8 * GiB), "mixtral")
    assert plan.fits, plan.reason
    assert plan.peak_pinned_bytes <= 8 * GiB
    assert plan.experts_in_ram == 8 * GiB // 352_321_536 - 2      # the staging ring takes two slots
    assert plan.peak_device_bytes <= CARD.memory_bytes
    assert plan.expert_cache_slots >= 1


def test_mixtral_without_ram_budget_pins_half_the_host_at_most():
    plan = make_plan(shape_from_folder(MIXTRAL), profile("rtx2080ti", host_ram_bytes=16 * GiB),
                     PlanRequest(batch=1, context=1024), "mixtral")
    assert plan.fits and plan.peak_pinned_bytes <= 8 * GiB + 2 * 352_321_536


def test_an_impossible_context_is_refused_with_alternatives():
    plan = make_plan(shape_from_folder(GEMMA_27B), card(), PlanRequest(batch=8, context=8192), "gemma-3-27b")
    assert not plan.fits
    assert "batch_size" in plan.reason and "context" in plan.reason


def test_host_ram_is_checked():
    plan = make_plan(shape_from_folder(GEMMA_27B), profile("rtx2080ti", host_ram_bytes=4 * GiB),
                     PlanRequest(batch=1, context=1024, ram_budget_bytes=20 * GiB), "gemma-3-27b")
    assert not plan.fits and "host RAM" in plan.reason


def test_config_only_folder_and_llama_like_shapes():
    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 100, "tie_word_embeddings": False}
    s = shape_from_config(llama)
    assert s.layer_numel == 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert s.non_layer_numel == 2 * 100 * 64 + 64 and s.layer_types == ("full_attention",) * 3
