"""A model's shape for the memory plan: element counts and attention layout from config.json, exact
sizes from the safetensors headers when the weights are there, or all of it from a GGUF header (stdlib only)."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.paging.plan.gguf_header import GGUFHeader, is_gguf, read_header

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    stored_bytes: int                 # bytes per element in the checkpoint (its torch_dtype)
    layer_numel: int                  # largest decoder layer, elements (MoE: without its experts)
    non_layer_numel: int              # embeddings, final norm, lm_head when untied
    largest_matrix_numel: int         # one weight, for dequantizing temporaries
    layer_types: tuple[str, ...]      # per layer: "full_attention" or "sliding_attention"
    sliding_window: int | None
    num_experts: int = 0
    experts_per_token: int = 0
    expert_numel: int = 0
    moe_layers: int = 0               # MoE: layers with routed experts (the others have a dense MLP)
    decoder_numel: int = 0            # MoE: every decoder layer without its routed experts, elements
    source: str = "config.json"       # or "safetensors headers" / "GGUF header" when sizes were read from files
    # A GGUF file: its blocks are what is read, cached and sent to the device (expanded per use there).
    weights_format: str = "safetensors"          # or "gguf"
    layer_stored_bytes: int = 0       # gguf: largest decoder layer's blocks (MoE: without its routed experts)
    decoder_stored_bytes: int = 0     # gguf: every decoder layer's blocks (MoE: without routed experts)
    non_layer_stored_bytes: int = 0   # gguf: embeddings, output, final norm as stored
    expert_stored_bytes: int = 0      # gguf MoE: one routed expert's slice of the fused blocks
    bytes_by_block_type: tuple[tuple[str, int], ...] = ()   # gguf: the whole file's tensor bytes by type

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def gguf(self) -> bool:
        return self.weights_format == "gguf"


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def shape_from_config(config: dict) -> ModelShape:
    """Element counts from config.json alone, for the decoder layouts transformers gives llama-like
    models (Llama, Mistral, Qwen2/3, Gemma 1-3) and the MoE families of plan/moe_layout.py (Mixtral,
    Qwen2/3-MoE, OLMoE, GLM-4-MoE, DeepSeek-V2/V3 with MLA attention, shared experts and dense layers mixed in);
    cross-checked against transformers' own classes on the meta device in tests/engine/test_memplan_engine.py
    and tests/engine/test_moe_families.py."""
    from jobs.paging.plan.moe_layout import expert_layout, num_routed_experts

    tc = text_config(config)
    model_type = tc.get("model_type") or config.get("model_type", "")
    hidden, inter = tc["hidden_size"], tc["intermediate_size"]
    heads = tc["num_attention_heads"]
    kv_heads = tc.get("num_key_value_heads") or heads
    head_dim = tc.get("head_dim") or hidden // heads
    vocab = tc.get("vocab_size") or (262208 if model_type.startswith("gemma3") else 32000)
    layers = tc["num_hidden_layers"]
    bias = bool(tc.get("attention_bias")) or model_type in ("qwen2", "qwen2_moe")
    attn = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if bias:
        attn += heads * head_dim + 2 * kv_heads * head_dim + (hidden if tc.get("attention_bias") else 0)
    if tc.get("kv_lora_rank"):
        attn, kv_heads, head_dim = _mla(tc, hidden, heads)
    gemma3 = model_type.startswith("gemma3")
    norms = (4 * hidden + 2 * head_dim) if gemma3 else 2 * hidden
    if model_type in ("qwen3", "qwen3_moe") or (model_type == "glm4_moe" and tc.get("use_qk_norm")):
        norms += 2 * head_dim                                       # q_norm, k_norm per head
    elif model_type == "olmoe":
        norms += (heads + kv_heads) * head_dim                      # q_norm, k_norm over all heads
    experts, expert_numel, moe_layers, decoder = num_routed_experts(tc), 0, 0, 0
    mlp = 3 * hidden * inter                                        # the dense MLP
    if experts:
        moe = expert_layout(tc)
        expert_numel, moe_layers = moe.expert_numel, moe.num_layers
        # the widest MLP a token passes through (prefill activations): a routed, shared or dense one
        inter = max(moe.intermediate, moe.shared_intermediate, moe.dense_intermediate)
        # a MoE layer keeps its router, shared expert(s) and their gate resident; the experts are paged
        mlp_moe = hidden * experts + 3 * hidden * moe.shared_intermediate + (hidden if moe.shared_gate else 0)
        decoder = moe_layers * (attn + norms + mlp_moe) + (layers - moe_layers) * (attn + norms + mlp)
        mlp = max(mlp_moe, mlp if moe_layers < layers else 0)
    tied = bool(tc.get("tie_word_embeddings", config.get("tie_word_embeddings", gemma3 or
                                                         model_type.startswith("gemma"))))
    non_layer = vocab * hidden * (1 if tied else 2) + hidden
    window = tc.get("sliding_window")
    types = tc.get("layer_types")
    if not types:
        pattern = tc.get("sliding_window_pattern") or tc.get("_sliding_window_pattern")
        if gemma3 and window:
            pattern = pattern or 6
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        else:
            types = ["sliding_attention" if window else "full_attention"] * layers
    stored = DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or tc.get("torch_dtype")
                                 or tc.get("dtype") or "bf16").replace("torch.", ""), 2)
    return ModelShape(model_type, layers, hidden, inter, heads, kv_heads, head_dim, vocab, tied, stored,
                      attn + norms + mlp, non_layer, max(hidden * inter, hidden * heads * head_dim),
                      tuple(types), window if window and "sliding_attention" in types else None,
                      experts, tc.get("num_experts_per_tok") or 0, expert_numel, moe_layers, decoder)


def _mla(tc: dict, hidden: int, heads: int) -> tuple[int, int, int]:
    """DeepSeek-V2/V3 multi-head latent attention: (attention elements, kv_heads, head_dim). transformers
    caches the compressed latent, kv_lora_rank + qk_rope_head_dim per token and layer, so the KV cache is
    counted as one head of half that width (K and V each)."""
    q_head = tc["qk_nope_head_dim"] + tc["qk_rope_head_dim"]
    kv_lora, rope, v_head, q_lora = tc["kv_lora_rank"], tc["qk_rope_head_dim"], tc["v_head_dim"], tc.get("q_lora_rank")
    bias = bool(tc.get("attention_bias"))
    if q_lora:   # q_a_proj (+bias), q_a_layernorm, q_b_proj
        q = hidden * q_lora + (q_lora if bias else 0) + q_lora + q_lora * heads * q_head
    else:
        q = hidden * heads * q_head
    kv = hidden * (kv_lora + rope) + ((kv_lora + rope) if bias else 0) + kv_lora \
        + kv_lora * heads * (tc["qk_nope_head_dim"] + v_head)
    out = heads * v_head * hidden + (hidden if bias else 0)
    return q + kv + out, 1, (kv_lora + rope) // 2


def shape_from_folder(model_dir: str | Path) -> ModelShape:
    """config.json, then exact sizes from the safetensors headers when the weights are there (a folder
    holding only config.json plans from the formulas: plan before downloading)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: point at a Hugging Face model folder")
    shape = shape_from_config(json.loads(path.read_text()))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files or shape.moe:
        return shape
    per_layer: dict[int, int] = {}
    other, largest, width = 0, 0, 0
    for f in files:
        for key, entry in safetensors_header(f).items():
            numel = math.prod(entry["shape"])
            parts = key.split(".")
            if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
                if "vision_tower" in parts or "multi_modal_projector" in parts:
                    continue
                i = int(parts[parts.index("layers") + 1])
                per_layer[i] = per_layer.get(i, 0) + numel
                if len(entry["shape"]) == 2:
                    largest = max(largest, numel)
            elif "vision_tower" not in parts and "multi_modal_projector" not in parts:
                other += numel
            width = max(width, _DT_BYTES.get(entry["dtype"], 2))
    if len(per_layer) != shape.num_layers:
        return shape  # the engine says what is wrong with the folder
    return replace(shape, layer_numel=max(per_layer.values()), non_layer_numel=other,
                   largest_matrix_numel=largest or shape.largest_matrix_numel, stored_bytes=width,
                   source="safetensors headers")


_DT_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "F8_E4M3": 1}


def safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (name -> dtype, shape, data_offsets), __metadata__ dropped."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


# llama.cpp architecture names -> the transformers model_type the plan's formulas key on
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                     "deepseek2": "deepseek_v2", "command-r": "cohere"}


def shape_from_path(path: str | Path) -> ModelShape:
    """A model folder (config.json, safetensors) or a GGUF file (any part of a split one)."""
    path = Path(path)
    if is_gguf(path):     # by its magic: Ollama's blobs have no .gguf suffix
        return shape_from_gguf(path)
    if path.is_file():
        raise ValueError(f"{path} is neither a .gguf file nor a model folder; point at a GGUF file or a folder "
                         "holding config.json")
    return shape_from_folder(path)


def config_from_gguf(header: GGUFHeader) -> dict:
    """The config.json keys the plan needs, from a GGUF's architecture-prefixed metadata."""
    arch, key = header.architecture, header.arch_key
    if not arch or key("block_count") is None:
        raise ValueError("the GGUF header names no general.architecture / block_count: not a model file "
                         "(a vision projector or LoRA adapter?)")

    def widest(name: str, default=None):   # per-layer arrays (some archs): the widest layer
        value = key(name, default)
        return max(value) if isinstance(value, list) else value

    hidden, heads = key("embedding_length"), widest("attention.head_count")
    experts = key("expert_count") or 0
    embd = header.tensors.get("token_embd.weight")
    model_type = _GGUF_MODEL_TYPES.get(arch, "mixtral" if arch == "llama" and experts else arch)
    config = {"model_type": model_type, "num_hidden_layers": key("block_count"), "hidden_size": hidden,
              "intermediate_size": widest("feed_forward_length") or key("expert_feed_forward_length"),
              "num_attention_heads": heads, "num_key_value_heads": widest("attention.head_count_kv") or heads,
              "head_dim": key("attention.key_length") or hidden // heads,
              "vocab_size": embd.shape[1] if embd is not None and len(embd.shape) == 2
              else len(header.metadata.get("tokenizer.ggml.tokens") or []) or None,
              "max_position_embeddings": key("context_length"),
              "tie_word_embeddings": "output.weight" not in header.tensors}
    if key("attention.sliding_window"):
        config["sliding_window"] = key("attention.sliding_window")
    if experts:
        config.update(num_local_experts=experts, num_experts_per_tok=key("expert_used_count") or 0)
        if key("expert_feed_forward_length"):
            config["moe_intermediate_size"] = key("expert_feed_forward_length")
        if key("expert_shared_feed_forward_length"):
            config["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length")
        if key("leading_dense_block_count") is not None:
            config["first_k_dense_replace"] = key("leading_dense_block_count")
        if key("expert_shared_count"):
            config["n_shared_experts"] = key("expert_shared_count")
    return config


def shape_from_gguf(path: str | Path) -> ModelShape:
    """Config from the GGUF metadata, exact stored bytes per layer from its tensor table; no weight read."""
    header = read_header(path)
    shape = shape_from_config(config_from_gguf(header))
    per_layer_bytes: dict[int, int] = {}
    per_layer_numel: dict[int, int] = {}
    expert_bytes: dict[int, int] = {}
    expert_numel: dict[int, int] = {}
    by_type: dict[str, int] = {}
    other_bytes = other_numel = largest = 0
    for t in header.tensors.values():
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
        parts = t.name.split(".")
        if parts[0] in ("v", "mm"):        # a vision tower stored beside the language model
            continue
        if parts[0] != "blk" or not parts[1].isdigit():
            other_bytes, other_numel = other_bytes + t.nbytes, other_numel + t.numel
            continue
        i = int(parts[1])
        per_layer_bytes.setdefault(i, 0)
        per_layer_numel.setdefault(i, 0)
        if "_exps" in parts[2]:            # routed experts fused [E, ...]: one expert is 1/E of it
            n = t.shape[-1] if len(t.shape) == 3 else max(1, shape.num_experts)
            expert_bytes[i] = expert_bytes.get(i, 0) + t.nbytes // n
            expert_numel[i] = expert_numel.get(i, 0) + t.numel // n
            continue
        per_layer_bytes[i] += t.nbytes
        per_layer_numel[i] += t.numel
        if len(t.shape) == 2:
            largest = max(largest, t.numel)
    if len(per_layer_bytes) != shape.num_layers:
        raise ValueError(f"the GGUF header says block_count {shape.num_layers} but its tensor table holds "
                         f"{len(per_layer_bytes)} blocks (blk.N.*): the file is damaged or split parts are missing")
    moe: dict[str, Any] = {}
    if shape.moe:
        if not expert_bytes:
            raise ValueError("the GGUF header names experts (expert_count) but its tensor table has no fused "
                             "*_exps tensors; this layout is not supported")
        moe = dict(expert_stored_bytes=max(expert_bytes.values()), expert_numel=max(expert_numel.values()),
                   moe_layers=len(expert_bytes), decoder_numel=sum(per_layer_numel.values()))
        # the pager expands a whole expert (gate_up and down) into the reused buffer at once
        largest = max(largest, max(expert_numel.values()))
    return replace(shape, layer_numel=max(per_layer_numel.values()), non_layer_numel=other_numel,
                   largest_matrix_numel=largest or shape.largest_matrix_numel, source="GGUF header",
                   weights_format="gguf", layer_stored_bytes=max(per_layer_bytes.values()),
                   decoder_stored_bytes=sum(per_layer_bytes.values()), non_layer_stored_bytes=other_bytes,
                   bytes_by_block_type=tuple(sorted(by_type.items(), key=lambda kv: -kv[1])), **moe)
