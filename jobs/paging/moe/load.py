"""Loading a MoE folder or GGUF file for expert paging: `load_paged_moe()` and the `PagedMoE` it returns.

Owns building the family's own transformers model (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, ...)
without expert weights and wiring in the pager; plan/moe_layout.py says which families qualify, and
gguf_experts.py how a GGUF file's experts and other weights are held.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from jobs.contract.errors import BudgetError, ModelFolderError
from jobs.contract.spec import DEFAULT_BATCH_SIZE, VARIANT_MODES, ModelSpec
from jobs.contract.units import format_size, parse_size
from jobs.paging.capability import resolve_dtype
from jobs.paging.copy_engine import CopyEngine, engine_for
from jobs.paging.dense.gguf_store import GgufStore
from jobs.paging.dtypes import dtype_name, torch_dtype
from jobs.paging.kernels import apply_kernels
from jobs.paging.moe.cache import ExpertCache, cache_capacity
from jobs.paging.moe.families import find_experts, layout_of
from jobs.paging.moe.gguf_experts import GgufExpertStore, bind_gguf_moe, check_gguf_moe
from jobs.paging.moe.pager import ExpertPager
from jobs.paging.moe.quant import QuantExpertStore
from jobs.paging.moe.store import CheckpointIndex, ExpertStore
from jobs.paging.plan.gguf_header import is_gguf
from jobs.paging.plan.memplan import MemoryPlan, PlanRequest, make_plan
from jobs.paging.plan.moe_layout import REFUSED, SUPPORTED_SENTENCE, TESTED, is_expert_key, num_routed_experts
from jobs.paging.plan.settings import is_moe_folder
from jobs.paging.plan.shape import shape_from_path
from jobs.paging.quant import QuantSpec, Variant
from jobs.paging.runtime import runtime_profile

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class PagedMoE:
    """A MoE model whose experts are paged; `.model` is the family's normal *ForCausalLM."""

    model: PreTrainedModel
    tokenizer: object | None
    device: torch.device
    store: ExpertStore
    cache: ExpertCache
    pager: ExpertPager
    kernels: dict = field(default_factory=lambda: {"kernels": "torch", "kernels_reason": "not applied"})
    plan: MemoryPlan | None = None  # memplan's plan this load was made from (it sized the expert cache)

    def stats(self) -> dict:
        """Counters since load (or the last reset_stats): hits, misses, prefetch_hits, bytes_h2d,
        stall_s, evictions, cpu_execs, prefetch accuracy, and the same per layer; the expert
        format (variant "precise" or e.g. "q4g64", bits per weight code, bytes per expert); the host
        side (host_ram_bytes, host_pinned_bytes, experts_in_ram, experts_from_disk, disk_reads,
        disk_read_bytes, disk_read_s: ExpertStore.stats); the kernels."""
        return {**self.cache.stats(), **self.store.stats(), "dtype": dtype_name(self.model.dtype),
                "expert_variant": self.store.variant,
                "expert_bits": self.store.bits, "expert_bytes": self.store.expert_bytes, **self.kernels,
                "plan_peak_device_bytes": self.plan.peak_device_bytes if self.plan else None,
                "plan_expert_cache_slots": self.plan.expert_cache_slots if self.plan else None}

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        self.store.reset_stats()

    def close(self) -> None:
        self.pager.close()
        self.cache.close()
        self.store.close()

    def __enter__(self) -> "PagedMoE":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_paged_moe(spec: ModelSpec, *, prefetch: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                   cache_scope: str = "global", cpu_miss_exec: bool = False, cpu_miss_max_tokens: int = 4,
                   quant_spec: QuantSpec | None = None, engine: CopyEngine | None = None) -> PagedMoE:
    """Non-expert weights resident on `device`, experts behind a device cache of `expert_cache_bytes`
    (None: the memory plan's expert slots, what fits next to everything else the run takes at batch_size x
    spec.context_tokens; a plan that cannot fit is refused with BudgetError before any weight is read). The store holds at most
    `ram_budget_bytes` of experts in host RAM (pinned on CUDA) and reads the others from the checkpoint
    on demand (None: all of them on CPU; on CUDA all that fit in half of MemAvailable).

    variant "precise": experts in `dtype`. "fast": experts from the folder's quantized variant
    (`quant_spec`, or its only one), stored and copied 4-bit and dequantized to `dtype` where they
    run; attention, norms, routers and embeddings stay precise and resident. "auto": fast when the
    folder has a variant, else precise.

    A GGUF file (spec.path a .gguf of an architecture transformers loads with its experts: qwen2moe,
    qwen3moe): each expert is its slice of the file's fused blocks in the store and the device cache, expanded
    to `dtype` where it runs; the other Linears stay resident as blocks and expand on use, all into one
    reused buffer (gguf_experts); config and tokenizer come from the file. Its variant is the file's own.

    spec: the model's settings (jobs.contract.spec.ModelSettings); the run-time arguments: prefetch (stage
    the predicted experts of the next layer), batch_size (rows the memory plan makes room for), cache_scope,
    cpu_miss_exec / cpu_miss_max_tokens (ExpertPager), quant_spec (which variant when there are several) and
    engine (jobs.paging.copy_engine: CUDA's on a GPU; on cpu None copies synchronously, a ThreadEngine (tests)
    runs the GPU's side stream, events and staging under its checker)."""
    model_dir = Path(spec.path)
    variant, kernels, cache_policy = spec.variant, spec.kernels, spec.cache_policy
    if not is_moe_folder(model_dir):
        raise ValueError(f"{model_dir} is not a MoE model folder (config.json has no num_local_experts, "
                         "num_experts or n_routed_experts; a GGUF header no expert_count); use the dense "
                         "layer-streaming engine for it")
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    dtype = torch_dtype(resolve_dtype(spec.dtype, device))  # "auto": capability.resolve_dtype, as the dense loader
    gguf = GgufStore(model_dir) if is_gguf(model_dir) else None
    if gguf is not None:
        check_gguf_moe(gguf.file, num_routed_experts(gguf.config.to_dict()))
        if variant == "fast":
            gguf.open_variant()  # refused: a GGUF's experts are already blocks
    config = gguf.config if gguf is not None else AutoConfig.from_pretrained(model_dir)
    if config.model_type in REFUSED:
        raise ValueError(f"{model_dir.name}: {REFUSED[config.model_type]}. {SUPPORTED_SENTENCE}")
    # transformers annotates its auto mappings' values as (slow, fast) tokenizer class pairs; a model
    # mapping holds one model class.
    model_class = cast("type[PreTrainedModel] | None", MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None))
    if model_class is None:
        raise ValueError(f"{model_dir.name}: transformers has no causal LM class for {config.model_type!r}. "
                         f"{SUPPORTED_SENTENCE}")
    if gguf is not None:
        # as the dense GGUF path builds it: the Linears' dtype is what their blocks expand to, RoPE's
        # inv_freq stays real
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        with torch.device("meta"):
            model = model_class(config)  # no memory: weights are filled in by _load_dense
    experts = find_experts(model)    # the family's experts modules, checked against the seam
    layout = layout_of(model, experts)
    if config.model_type not in TESTED:
        log.warning("%s: %s has the experts seam the pager replaces but is not among the families tested "
                    "against transformers (%s); compare a few outputs with the resident model before relying "
                    "on it", model_dir.name, config.model_type, ", ".join(TESTED))
    n_layers, n_experts = layout.num_layers, layout.num_experts
    pin = device.type == "cuda"
    engine = engine_for(device, engine)
    quantized = None if gguf is not None else _open_variant(model_dir, variant, quant_spec)
    if gguf is not None:
        gguf_experts = GgufExpertStore(layout, gguf.file, dtype, pin_memory=pin, engine=engine)
        store: ExpertStore = gguf_experts
    elif quantized is None:
        store = ExpertStore(layout, dtype, pin_memory=pin, engine=engine)
    else:
        store = QuantExpertStore(layout, quantized, dtype, pin_memory=pin, engine=engine)
    expert_bytes = store.expert_bytes

    # Budgets the user gave are checked before reading a byte of weights.
    expert_cache_bytes = None if spec.expert_cache_bytes is None else parse_size(spec.expert_cache_bytes)
    if expert_cache_bytes is not None:
        cache_capacity(expert_cache_bytes, expert_bytes, n_layers, cache_scope)
    ram_budget_bytes = store.resolve_ram_budget(  # CUDA without one: a share of MemAvailable
        None if spec.ram_budget_bytes is None else parse_size(spec.ram_budget_bytes))
    store.check_budget(ram_budget_bytes)
    # The memory plan, against the device as it is now (runtime_profile, capped by device_memory_bytes), is
    # the one budget: it refuses what cannot fit and, without expert_cache_bytes, sizes the cache.
    memory = make_plan(shape_from_path(model_dir), runtime_profile(device, spec.device_memory_bytes),
                       _plan_request(spec, batch_size, dtype_name(dtype), prefetch, quantized), spec.name)
    if not memory.fits:
        raise BudgetError(f"model {spec.name}: {memory.reason}")

    if gguf is not None:
        bind_gguf_moe(model, experts, gguf, gguf_experts, device, dtype)
        applied = apply_kernels(model, device, kernels)  # norms and RoPE only, as for a folder
        gguf_experts.load(None, ram_budget_bytes)
    else:
        index = CheckpointIndex(model_dir)
        try:
            model = _load_dense(model, experts, index, device, dtype)
            applied = apply_kernels(model, device, kernels)  # norms and RoPE only: the experts are the pager's
            store.load(index, ram_budget_bytes)
        finally:
            index.close()
    if expert_cache_bytes is None:  # the plan's slots: what fits next to the KV cache and activations of the batch
        expert_cache_bytes = memory.expert_cache_slots * expert_bytes
    cache = ExpertCache(store, expert_cache_bytes, device=device, policy=cache_policy,
                        scope=cache_scope)
    pager = ExpertPager(model, store, cache, prefetch=prefetch, cpu_miss_exec=cpu_miss_exec,
                        cpu_miss_max_tokens=cpu_miss_max_tokens, experts=experts)
    tokenizer = gguf.tokenizer() if gguf is not None else None
    if gguf is None and any((model_dir / name).exists() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log.info("paged MoE %s (%s): %d MoE layers x %d experts (%s), cache %d/%d experts (%s) on %s",
             model_dir.name, config.model_type, n_layers, n_experts, store.variant, cache.capacity,
             n_layers * n_experts, format_size(cache.allocated_bytes), device)
    return PagedMoE(model=model, tokenizer=tokenizer, device=device, store=store, cache=cache,
                    pager=pager, kernels=applied, plan=memory)


def _plan_request(spec: ModelSpec, batch_size: int, dtype: str, prefetch: bool,
                  quantized: Variant | None) -> PlanRequest:
    """What the plan counts: the experts as they will be stored (the variant opened, not the setting's name)."""
    request = PlanRequest.for_model(spec, batch=batch_size, dtype=dtype, prefetch=prefetch)
    if quantized is None:
        return dataclasses.replace(request, variant="precise")
    return dataclasses.replace(request, variant="fast", bits=quantized.spec.bits,
                               group_size=quantized.spec.group_size)


def _open_variant(model_dir: Path, variant: str, spec: QuantSpec | None) -> Variant | None:
    """The quantized variant the experts come from, or None for precise experts."""
    if variant not in VARIANT_MODES:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANT_MODES)}")
    if variant == "precise":
        return None
    try:
        return Variant.open(model_dir, spec)
    except FileNotFoundError as exc:
        if variant == "auto":
            return None
        name = spec.name if spec else "a 4-bit"
        raise ModelFolderError(
            f"variant 'fast' needs {name} variant of {model_dir}, and there is none ({exc}); write "
            f"it with `lab-attendant model quantize NAME --bits 4` or `python -m jobs.paging.quant "
            f"--model {model_dir} --bits 4`, or use variant 'precise'") from None


def _load_dense(model: PreTrainedModel, experts: dict, index: CheckpointIndex, device: torch.device,
                dtype: torch.dtype) -> PreTrainedModel:
    """The meta-built transformers model with every non-expert weight loaded (attention, norms, routers,
    shared experts, dense MLP layers) and no expert weights at all: filled tensor by tensor with
    assign=True (no extra copy)."""
    config = model.config
    for idx in experts:
        model.model.layers[idx].mlp.experts = torch.nn.Module()  # placeholder until the pager installs its own
    state = {}
    for name in index.keys():
        if is_expert_key(name):
            continue
        # Checkpoints name the MoE block block_sparse_moe; transformers 5 calls it mlp.
        state[name.replace(".block_sparse_moe.", ".mlp.")] = index.read(name).to(device, dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "lm_head.weight" or
               not config.tie_word_embeddings]
    if missing or result.unexpected_keys:
        raise KeyError(f"checkpoint {index.model_dir} does not match {type(model).__name__}: "
                       f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE frequencies are a computed (non-persistent) buffer: rebuild it off the meta device,
    # in float32 exactly as transformers does.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"weights never loaded: {leftover[:5]}")
    model.config.dtype = dtype
    gen_path = index.model_dir / "generation_config.json"
    if gen_path.exists():
        model.generation_config = GenerationConfig.from_pretrained(index.model_dir)
    return model.eval()
