"""Tiny random Mixtral folders for the expert-paging tests, in each checkpoint layout.

Shared by tests/engine and tests/gpu; imported by path, not a fixture plugin.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from jobs.paging.quant import Variant, dequantize_weight

TINY = dict(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=512, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, initializer_range=0.1)


def tiny_mixtral(seed: int = 0, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**{**TINY, **overrides})).eval()


def save_hf(model: MixtralForCausalLM, folder: Path) -> Path:
    """transformers' own save_pretrained (5.x writes per-expert w1/w2/w3 under block_sparse_moe)."""
    model.save_pretrained(folder)
    return folder


def save_fused(model: MixtralForCausalLM, folder: Path) -> Path:
    """The in-memory transformers 5 layout: mlp.experts.gate_up_proj [E, 2I, H] / down_proj."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def save_per_expert_sharded(model: MixtralForCausalLM, folder: Path) -> Path:
    """Released-checkpoint layout written by hand from the fused weights, in two shards with an
    index: w1 = gate rows of gate_up_proj, w3 = up rows, w2 = down_proj."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    inter = model.config.intermediate_size
    shards: list[dict] = [{}, {}]
    for name, tensor in model.state_dict().items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        shard = shards[layer % 2] if layer >= 0 else shards[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            for e in range(tensor.shape[0]):
                shard[f"{prefix}.{e}.w1.weight"] = tensor[e, :inter].clone()
                shard[f"{prefix}.{e}.w3.weight"] = tensor[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
            for e in range(tensor.shape[0]):
                shard[f"{prefix}.{e}.w2.weight"] = tensor[e].clone()
        else:
            shard[name.replace(".mlp.", ".block_sparse_moe.")] = tensor.contiguous()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(folder / fname))
        weight_map.update({k: fname for k in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def expert_bytes(model: MixtralForCausalLM, itemsize: int = 4) -> int:
    c = model.config
    return 3 * c.hidden_size * c.intermediate_size * itemsize


def prompts(batch: int, length: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def dequantized_experts(folder) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(gate_up, down) of every expert, read straight from the variant shards (not via the store)."""
    variant = Variant.open(folder)
    weights: dict[str, torch.Tensor] = {}
    for key, shape in variant.shapes.items():
        if ".experts." not in key:
            continue
        with safe_open(variant.file_of[key], framework="pt") as f:
            parts = {p.rsplit(".", 1)[1]: f.get_tensor(p) for p in variant.part_keys(key)}
        weights[key] = dequantize_weight(parts, shape, variant.spec, torch.float32)
    out = {}
    for layer in range(TINY["num_hidden_layers"]):
        for e in range(TINY["num_local_experts"]):
            fused = f"model.layers.{layer}.mlp.experts.gate_up_proj.{e}"
            if fused in weights:
                out[(layer, e)] = (weights[fused], weights[f"model.layers.{layer}.mlp.experts.down_proj.{e}"])
            else:
                p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                out[(layer, e)] = (torch.cat([weights[p + "w1.weight"], weights[p + "w3.weight"]]),
                                   weights[p + "w2.weight"])
    return out


def reference(folder, experts=None) -> MixtralForCausalLM:
    """transformers' own model on the folder, its expert weights replaced by `experts` if given."""
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for (layer, e), (gate_up, down) in (experts or {}).items():
        mod = model.model.layers[layer].mlp.experts
        with torch.no_grad():
            mod.gate_up_proj[e].copy_(gate_up)
            mod.down_proj[e].copy_(down)
    return model
