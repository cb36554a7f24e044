"""shape_from_config's MoE counts against transformers' own classes on the meta device: shared experts,
moe_intermediate_size, num_experts / n_routed_experts, dense layers mixed in, DeepSeek's MLA attention."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from jobs.paging.moe.families import find_experts, layout_of
from jobs.paging.plan.memplan import PlanRequest, make_plan
from jobs.paging.plan.moe_layout import expert_layout
from jobs.paging.plan.profiles import DeviceProfile
from jobs.paging.plan.shape import shape_from_config

pytestmark = pytest.mark.engine

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4)
CONFIGS = {
    "deepseek_v2 q_lora, group-limited": ("deepseek_v2", TINY | MLA | dict(
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, q_lora_rank=24, n_group=2, topk_group=1, topk_method="group_limited_greedy",
        attention_bias=True)),
    "deepseek_v3 two dense layers": ("deepseek_v3", TINY | MLA | dict(
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        first_k_dense_replace=2, q_lora_rank=None, n_group=2, topk_group=1)),
    "qwen3_moe mlp_only_layers": ("qwen3_moe", TINY | dict(
        intermediate_size=64, moe_intermediate_size=16, num_experts=16, num_experts_per_tok=4, head_dim=8,
        mlp_only_layers=[0])),
    "qwen2_moe decoder_sparse_step": ("qwen2_moe", TINY | dict(
        intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        shared_expert_intermediate_size=32, decoder_sparse_step=2)),
    "glm4_moe qk norm": ("glm4_moe", TINY | dict(
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8, use_qk_norm=True)),
    "olmoe": ("olmoe", TINY | dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, eos_token_id=2)),
    "mixtral": ("mixtral", TINY | dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    # Released shapes (meta device: no memory): DeepSeek-Coder-V2-Lite and Qwen3-30B-A3B.
    "deepseek-v2-lite shape": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_group=1, topk_group=1, topk_method="greedy")),
    "qwen3-30b-a3b shape": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_formulas_match_transformers_on_meta(name):
    model_type, kwargs = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(json.loads(json.dumps(config.to_dict())))   # what config.json holds
    layers = model.model.layers
    routed = [sum(p.numel() for n, p in layer.named_parameters() if n.startswith("mlp.experts.")) for layer in layers]
    resident = [sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("mlp.experts."))
                for layer in layers]
    assert shape.decoder_numel == sum(resident) and shape.layer_numel == max(resident)
    assert sum(routed) == shape.moe_layers * shape.num_experts * shape.expert_numel
    in_layers = {id(p) for p in layers.parameters()}
    assert sum(p.numel() for p in model.parameters() if id(p) not in in_layers) == shape.non_layer_numel
    # the config's layout (memory plan) and the one read off the model (pager) agree
    found = layout_of(model, find_experts(model))
    assert found == expert_layout(config.to_dict())
    assert found.layers == tuple(i for i, n in enumerate(routed) if n) and shape.moe_layers == len(found.layers)
    if "kv_lora_rank" in kwargs:   # transformers caches the latent: kv_lora_rank + rope dims per token and layer
        assert 2 * shape.kv_heads * shape.head_dim == kwargs["kv_lora_rank"] + kwargs["qk_rope_head_dim"]


def test_plan_counts_shared_experts_and_only_moe_layers_experts():
    _, kwargs = CONFIGS["deepseek-v2-lite shape"]
    shape = shape_from_config(kwargs | {"model_type": "deepseek_v2"})
    assert (shape.moe_layers, shape.num_experts) == (26, 64)
    card = DeviceProfile("16 GiB card", "cuda", 16 * 1024**3, 500 * 1024**2, 25e9, (8, 9), 64 * 1024**3)
    plan = make_plan(shape, card, PlanRequest(batch=1, context=512, dtype="bf16", expert_cache_bytes=10 * 1024**3,
                                              ram_budget_bytes=40 * 1024**3), "lite")
    assert plan.fits, plan.reason
    rows = {r["item"]: r for r in plan.rows}
    assert rows["attention, norms, routers"]["bytes"] == shape.decoder_numel * 2     # shared experts, dense layer
    assert "of 1664 experts" in rows["expert cache"]["detail"]                       # 26 MoE layers x 64, not 27
    expert = shape.expert_numel * 2
    assert plan.expert_cache_slots == 10 * 1024**3 // expert


def test_mlp_layer_types_config_gives_the_models_moe_layers():
    """Families that name each layer "dense" or "sparse" (here GLM-4-MoE-Lite): the plan's layers are the
    model's."""
    config = AutoConfig.for_model("glm4_moe_lite", num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    found = layout_of(model, find_experts(model))
    assert found.layers == (1, 2) == expert_layout(config.to_dict()).layers
