"""Which transformers MoE families the expert pager can page, and where each keeps its experts, read
from config.json (stdlib, for the memory plan and is_moe_folder); jobs.paging.moe.families reads the built model.

A family is supported when its experts module is transformers' shared seam: a fused gate_up_proj
[E, 2I, H] (gate rows then up rows) and down_proj [E, H, I], no biases, act(gate) * up, called as
experts(hidden_states, top_k_index, top_k_weights), with the router at `mlp.gate`. Found from the model,
not from a list of names; the names below only word the errors and the docs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Checked on transformers 5.23 (tests/engine/test_moe_families.py pages each on CPU).
TESTED = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe")
SUPPORTED_SENTENCE = ("expert paging supports transformers MoE models whose experts are one fused "
                      "gate_up_proj/down_proj module called as experts(hidden_states, top_k_index, "
                      "top_k_weights) under layer.mlp.experts, with the router at layer.mlp.gate: Mixtral, "
                      "Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, GLM-4-MoE, OLMoE (tested) and families built the "
                      "same way")
# Families with experts that look like MoE in config.json but not like the seam above.
REFUSED = {
    "gpt_oss": "gpt-oss experts take (router_indices, routing_weights), keep gate and up interleaved in a "
               "transposed [E, H, 2I] tensor with biases and a clamped SwiGLU, and ship as MXFP4 blocks the "
               "expert store cannot read; run it with transformers directly or as a dense model",
}

# Checkpoint names of one expert's weights. Released Mixtral checkpoints: w1 (gate), w3 (up), w2 (down)
# under block_sparse_moe; what transformers 5's save_pretrained writes for every tested family (it reverts
# its in-memory fusion): mlp.experts.N.{gate,up,down}_proj.weight; the in-memory fused layout
# mlp.experts.{gate_up_proj,down_proj} [E, ...] as well.
PER_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                           r"(w[123]|gate_proj|up_proj|down_proj)\.weight$")
FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
# Where each piece goes in the flat expert buffer: gate rows, up rows (together gate_up), then down.
PIECE_ORDER = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "gate_up_proj": 0, "w2": 2, "down_proj": 2}


def is_expert_key(name: str) -> bool:
    return bool(PER_EXPERT_RE.match(name) or FUSED_RE.match(name))


@dataclass(frozen=True)
class ExpertLayout:
    """What the store and cache need to know about a model's routed experts."""

    model_type: str
    layers: tuple[int, ...]         # decoder layers with routed experts; the others have a dense MLP
    num_experts: int                # routed experts per MoE layer
    experts_per_token: int          # top-k
    hidden: int
    intermediate: int               # of one routed expert
    shared_intermediate: int = 0    # of the always-resident shared expert(s) of a MoE layer, 0: none
    shared_gate: bool = False       # Qwen2-MoE: a sigmoid gate [1, H] scales the shared expert
    dense_intermediate: int = 0     # of the dense MLP layers mixed in, 0: none

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def expert_numel(self) -> int:
        """Elements of one expert: gate_up [2I, H] followed by down [H, I]."""
        return 3 * self.hidden * self.intermediate


def _as_dict(config) -> dict:
    config = config if isinstance(config, dict) else config.to_dict()
    return config.get("text_config") or config


def num_routed_experts(tc: dict) -> int:
    """Routed experts per MoE layer as config.json names them (Mixtral/gpt-oss, Qwen/OLMoE, DeepSeek)."""
    return int(tc.get("num_local_experts") or tc.get("num_experts") or tc.get("n_routed_experts") or 0)


def expert_layout(config) -> ExpertLayout:
    """The layout config.json implies (a dict or a transformers config); ValueError for a family the
    pager refuses or a config with no experts."""
    tc = _as_dict(config)
    model_type = tc.get("model_type", "")
    if model_type in REFUSED:
        raise ValueError(f"{REFUSED[model_type]}. {SUPPORTED_SENTENCE}")
    experts = num_routed_experts(tc)
    if not experts:
        raise ValueError(f"config.json of {model_type!r} names no experts (num_local_experts, num_experts or "
                         f"n_routed_experts); use the dense layer-streaming engine for it")
    n_layers = tc["num_hidden_layers"]
    if tc.get("mlp_layer_types"):                # newer families: "dense" or "sparse" per layer
        layers = tuple(i for i, kind in enumerate(tc["mlp_layer_types"]) if kind == "sparse")
    elif "first_k_dense_replace" in tc:          # DeepSeek: the first k layers are dense
        layers = tuple(range(tc["first_k_dense_replace"] or 0, n_layers))
    else:                                        # Qwen-MoE: mlp_only_layers, every decoder_sparse_step-th
        only = set(tc.get("mlp_only_layers") or ())
        step = tc.get("decoder_sparse_step") or 1
        layers = tuple(i for i in range(n_layers) if i not in only and (i + 1) % step == 0)
    inter = tc.get("moe_intermediate_size") or tc["intermediate_size"]
    shared = tc.get("shared_expert_intermediate_size") or 0
    if tc.get("n_shared_experts"):
        shared = tc["n_shared_experts"] * inter
    dense = tc["intermediate_size"] if len(layers) < n_layers else 0
    return ExpertLayout(model_type, layers, experts, tc.get("num_experts_per_tok") or 0, tc["hidden_size"],
                        inter, shared, model_type == "qwen2_moe" and bool(shared), dense)
