"""The MoE layout read off a built transformers model: which layers hold the experts seam the pager
replaces (find_experts) and their shapes (layout_of); the config-only layout is jobs.paging.plan.moe_layout.
"""
from __future__ import annotations

from typing import Any

from jobs.paging.plan.moe_layout import SUPPORTED_SENTENCE, ExpertLayout, expert_layout


def find_experts(model) -> dict[int, Any]:
    """Decoder layer index -> its experts module, for every layer whose `mlp.experts` is the seam the
    pager replaces; ValueError naming what is supported when a MoE-looking layer is not that seam."""
    from transformers.integrations import moe

    # transformers' own act(gate) * up (5.23); a family that brings its own _apply_gate is refused
    default_apply_gate = getattr(moe, "_default_apply_gate", None)
    found = {}
    for idx, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if experts is None:
            continue  # a dense MLP layer: stays resident, untouched
        why = _unsupported(experts, mlp, default_apply_gate)
        if why:
            raise ValueError(f"{type(model).__name__} layer {idx}: {type(experts).__name__} {why}. "
                             f"{SUPPORTED_SENTENCE}")
        found[idx] = experts
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer.mlp.experts module to page. {SUPPORTED_SENTENCE}")
    return found


def _unsupported(experts, mlp, default_apply_gate) -> str:
    """Why `experts` is not the fused gate_up/down seam, or '' when it is."""
    import inspect

    params = list(inspect.signature(type(experts).forward).parameters)[1:4]
    if params != ["hidden_states", "top_k_index", "top_k_weights"]:
        return f"is called as forward({', '.join(params)}), not (hidden_states, top_k_index, top_k_weights)"
    names = {n for n, _ in experts.named_parameters()}
    if names != {"gate_up_proj", "down_proj"}:
        return f"has weights {sorted(names)}, not exactly gate_up_proj and down_proj"
    gate_up, down = experts.gate_up_proj.shape, experts.down_proj.shape
    if len(gate_up) != 3 or len(down) != 3 or gate_up[1] != 2 * down[2] or gate_up[2] != down[1]:
        return f"has gate_up_proj {list(gate_up)} and down_proj {list(down)}, not [E, 2I, H] and [E, H, I]"
    flags = {k: getattr(experts, k, d) for k, d in (("is_transposed", False), ("has_bias", False),
                                                    ("is_concatenated", True), ("has_gate", True),
                                                    ("has_post_expert_norm", False))}
    if flags != {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True,
                 "has_post_expert_norm": False}:
        return f"declares {flags}"
    # (a transformers without _default_apply_gate: the signature, shape and flag checks above stand alone)
    if default_apply_gate is not None and getattr(type(experts), "_apply_gate", default_apply_gate) \
            is not default_apply_gate:
        return "applies its own gating function, not act(gate) * up"
    if not callable(getattr(experts, "act_fn", None)):
        return "has no act_fn"
    if not hasattr(mlp, "gate"):
        return "has no router at mlp.gate"
    return ""


def layout_of(model, experts: dict[int, Any]) -> ExpertLayout:
    """The layout read off the built model (shapes of the meta parameters), shared parts from its config."""
    # `experts`: transformers' fused experts modules (find_experts); Any because nn.Module's __getattr__
    # types every attribute as Tensor | Module, and gate_up_proj is a Parameter here.
    first = next(iter(experts.values()))
    n, two_i, hidden = first.gate_up_proj.shape
    for idx, mod in experts.items():
        if tuple(mod.gate_up_proj.shape) != (n, two_i, hidden):
            raise ValueError(f"layer {idx}'s experts differ in shape from layer {next(iter(experts))}'s; "
                             "the pager needs one expert size per model")
    by_config = expert_layout(model.config)
    return ExpertLayout(by_config.model_type, tuple(experts), n, by_config.experts_per_token, hidden, two_i // 2,
                        by_config.shared_intermediate, by_config.shared_gate, by_config.dense_intermediate)
