"""Tiny random checkpoints of the non-Mixtral MoE families, written by transformers' save_pretrained.

Used by tests/engine/test_moe_families.py (bench/moe_bench.py --family writes its own, larger shapes).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from jobs.paging.quant import Variant, dequantize_weight

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
# What each exercises: DeepSeek-V2 MLA attention, two shared experts, a dense first layer and group-limited
# routing with a scaling factor; Qwen3-MoE many small experts with top-4; Qwen2-MoE a gated shared expert
# and a dense layer between two MoE layers (mlp_only_layers);
# OLMoE every layer MoE with q/k norms over all heads; DeepSeek-V3 (and GLM-4-MoE, built on it) sigmoid scores
# with a score-correction bias chosen per group (noaux_tc), q LoRA, a shared expert, a dense first layer.
FAMILIES = {
    "deepseek_v2": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, topk_method="group_limited_greedy",
                        n_group=2, topk_group=1, routed_scaling_factor=1.5,
                        num_key_value_heads=4),  # MLA expands K/V to every head, as the released configs say
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, num_key_value_heads=4),
    "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                     num_experts_per_tok=3, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8,
                     partial_rotary_factor=0.5),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=16, num_experts_per_tok=4,
                      head_dim=8, norm_topk_prob=True),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=32, mlp_only_layers=[1]),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
}


def family_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def tiny_family(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides)).eval()
    with torch.no_grad():
        for module in model.modules():   # DeepSeek-V3's correction bias starts at zero: make it matter
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


def save_family(model, folder: Path) -> Path:
    """transformers' own save_pretrained (5.x writes mlp.experts.N.{gate,up,down}_proj.weight)."""
    model.save_pretrained(folder)
    return folder


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def expert_bytes(model, itemsize: int = 4) -> int:
    experts = model.model.layers[moe_layers(model)[0]].mlp.experts
    return (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * itemsize


def num_experts(model) -> int:
    return model.model.layers[moe_layers(model)[0]].mlp.experts.gate_up_proj.shape[0]


def record_routing(model) -> tuple[list, list]:
    """Forward hooks on every router (`mlp.gate`): per call, (layer, set of experts chosen). Returns the
    list the hooks append to and the handles (remove them when done)."""
    calls: list[tuple[int, set[int]]] = []
    handles = []
    for idx in moe_layers(model):
        def hook(_module, _args, output, idx=idx):
            calls.append((idx, set(output[2].flatten().tolist())))
        handles.append(model.model.layers[idx].mlp.gate.register_forward_hook(hook))
    return calls, handles


def dequantized_reference(model, folder):
    """`model` with its expert weights replaced by the variant's dequantized ones (read straight from
    the variant shards, not through the store): what transformers computes on the 4-bit experts."""
    from safetensors import safe_open

    variant = Variant.open(folder)
    for idx in moe_layers(model):
        experts = model.model.layers[idx].mlp.experts
        for e in range(experts.gate_up_proj.shape[0]):
            parts = []
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{idx}.mlp.experts.{e}.{proj}.weight"
                with safe_open(variant.file_of[key], framework="pt") as f:
                    packed = {p.rsplit(".", 1)[1]: f.get_tensor(p) for p in variant.part_keys(key)}
                parts.append(dequantize_weight(packed, variant.shapes[key], variant.spec, torch.float32))
            with torch.no_grad():
                experts.gate_up_proj[e].copy_(torch.cat(parts[:2]))
                experts.down_proj[e].copy_(parts[2])
    return model
