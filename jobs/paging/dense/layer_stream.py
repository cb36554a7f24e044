"""Runs a transformers causal LM whose decoder layers are streamed from safetensors or a GGUF file during forward.

Owns loading: the memory plan checked before any weight is read (memplan), the model built on the meta
device, non-layer weights placed, the streamer (streamer.LayerStreamer) wired in; and the pass counters.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.contract.errors import BudgetError, KernelError, ModelFolderError
from jobs.contract.spec import DEFAULT_BATCH_SIZE, VARIANT_MODES, ModelSpec
from jobs.contract.units import format_size
from jobs.paging.block_weights import BlockHead, keep_expanded
from jobs.paging.copy_engine import CopyEngine, engine_for
from jobs.paging.dense.gguf_store import GgufStore
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.dense.streamer import LayerStreamer, StreamPlan, assign_tensors
from jobs.paging.dense.variants import FAST, PRECISE, bytes_by_choice, choose_variants, summary
from jobs.paging.dtypes import dtype_name, to_device_as
from jobs.paging.kernels import apply_kernels
from jobs.paging.numerics import Fp16Safe, resolve_numerics
from jobs.paging.plan.gguf_header import is_gguf
from jobs.paging.plan.memplan import MemoryPlan, PlanRequest, make_plan
from jobs.paging.plan.shape import shape_from_path
from jobs.paging.quant import QuantSpec
from jobs.paging.runtime import runtime_profile

logger = logging.getLogger(__name__)


class StreamedModel:
    """A transformers causal LM plus tokenizer whose decoder layers stream from disk."""

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device,
                 store: ModelStore | GgufStore, streamer: LayerStreamer, kernels: dict[str, str] | None = None,
                 fp16_safe: bool = False) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.fp16_safe = fp16_safe  # numerics.Fp16Safe hooks are on the layers
        self._store, self._streamer = store, streamer
        self.kernels = kernels or {"kernels": "torch", "kernels_reason": "not applied"}
        self.plan: MemoryPlan | None = None  # memplan's plan this load was made from
        self._passes = 0
        self._pass_s = 0.0
        self._pass_start = 0.0
        model.register_forward_pre_hook(self._pass_begin)
        model.register_forward_hook(self._pass_end)

    def _pass_begin(self, module: nn.Module, args: Any) -> None:
        self._streamer.begin_pass()
        self._pass_start = time.perf_counter()

    def _pass_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued kernels count as compute, not as the next pass
        self._pass_s += time.perf_counter() - self._pass_start
        self._passes += 1

    def stats(self) -> dict[str, Any]:
        """Counters since load: disk bytes, device bytes, time blocked on I/O vs computing."""
        streamer = self._streamer.stats()
        return {
            "bytes_read": self._store.bytes_read,
            **streamer,
            "compute_s": max(0.0, self._pass_s - streamer["io_wait_s"]),
            "passes": self._passes,
            "layer_bytes": self._store.layer_nbytes,
            "num_layers": self._store.num_layers,
            "dtype": dtype_name(self._streamer.dtype),
            "fp16_safe": self.fp16_safe,
            "plan_peak_device_bytes": self.plan.peak_device_bytes if self.plan else None,
            "plan_peak_pinned_bytes": self.plan.peak_pinned_bytes if self.plan else None,
            "plan_context_tokens": self.plan.request["context"] if self.plan else None,
            # GGUF: layers stay blocks and expand per use into one buffer, but where nothing streams the
            # plan keeps as many resident layers expanded (at first use) as the room left allows
            "weights_format": "gguf blocks" if isinstance(self._store, GgufStore) else "safetensors",
            "expanded_layers": self.plan.expanded_layers if self.plan else 0,
            "expanded_head": self.plan.expanded_head if self.plan else False,
            "expansion_buffer_bytes": (self._store.buffer.nbytes if isinstance(self._store, GgufStore)
                                       and self._store.buffer is not None else 0),
            **self.kernels,
        }

    def close(self) -> None:
        """Stop the prefetch thread and drop cached layers; the model is unusable afterwards."""
        self._streamer.close()
        self._store.close()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_streamed(spec: ModelSpec, *, prefetch: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                  stream_bytes_budget: int | None = None, variant_spec: QuantSpec | None = None,
                  engine: CopyEngine | None = None) -> StreamedModel:
    """Open a decoder-only safetensors folder, or a GGUF file, for layer streaming.

    A GGUF file (spec.path a .gguf) streams its raw blocks: they are what is read, cached in RAM and copied
    to the device, where each Linear's weight is expanded to the compute dtype just before it runs, into one
    buffer all of them reuse (gguf_store, block_weights); config and tokenizer come from the file through
    transformers. It has no fast variant, and runs transformers' own modules (kernels "torch").

    spec: the model's settings (jobs.contract.spec.ModelSettings says what each means); the run-time
    arguments: prefetch (read the next layer while this one computes), batch_size (rows the memory plan
    makes room for, each of spec.context_tokens), stream_bytes_budget and variant_spec (below).
    Before any weight is read, memplan.make_plan counts every byte the run takes on the device (CUDA
    context, embeddings, KV cache for batch_size x context_tokens of kv_cache, prefill activations,
    resident layers, streaming slots, margin) against the free device memory (runtime_profile, capped by
    device_memory_bytes) and raises BudgetError, naming what would fit, when it cannot.
    vram_budget_bytes bounds the decoder layers on the device at once (resident + slots), an upper bound:
    None means as many as the device holds next to everything else.
    ram_budget_bytes bounds streamed layers kept in host RAM between passes (None: none); on CUDA they sit
    in one exact pinned arena.
    On cpu, "device" and host are the same memory: bytes_h2d then counts bytes handed to layers
    (packed bytes for fast layers).
    variant: "precise" (original weights), "fast" (the folder's quantized variant wherever it has
    one) or "auto" (variants.choose_variants: first/last keep_precise layers and the resident ones
    precise, the rest fast; stream_bytes_budget upgrades more layers while a pass's disk reads fit).
    Fast layers need `lab-attendant model quantize NAME --bits 4` to have run on the folder;
    variant_spec names the variant when the folder has several.
    engine: the copy engine (jobs.paging.copy_engine), CUDA's on a GPU; on cpu None runs layers where they were
    read, and a ThreadEngine (tests) runs the GPU's slots, staging ring and cache arena under its checker.
    kernels: "auto" patches Liger's fused kernels in on CUDA when installed, "liger" insists, "torch" never.
    dtype "auto" and fp16_safe: numerics.resolve_numerics (fp32 on cpu, bf16 from sm_80, fp16 below; the fp16-safe
    hooks in fp16 for models that overflow it, e.g. Gemma).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, device, fp16_safe, kernels = spec.path, spec.device, spec.fp16_safe, spec.kernels
    vram_budget_bytes, ram_budget_bytes, device_memory_bytes = (spec.vram_budget_bytes, spec.ram_budget_bytes,
                                                                spec.device_memory_bytes)
    variant, keep_precise, context_tokens, kv_cache = (spec.variant, spec.keep_precise_layers, spec.context_tokens,
                                                       spec.kv_cache)
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    gguf = is_gguf(model_dir)
    store = GgufStore(model_dir) if gguf else ModelStore(model_dir)
    dtype, safe = resolve_numerics(spec.dtype, fp16_safe, torch_device, store.text_config.model_type)
    if safe and kernels == "liger":
        raise KernelError("kernels = \"liger\" fuses the MLP and norms past the fp16-safe hooks: use kernels "
                          "\"torch\" or \"auto\", or dtype \"fp32\"/\"bf16\", or fp16_safe = \"off\"")
    if gguf and kernels == "liger":
        raise KernelError("kernels = \"liger\" fuses the MLP past the Linears that expand GGUF blocks: use kernels "
                          "\"torch\" or \"auto\" with a .gguf model")
    if variant != PRECISE:
        if variant not in VARIANT_MODES:
            raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANT_MODES)}")
        store.open_variant(variant_spec)
    # include_buffers=False keeps non-persistent buffers (rotary inv_freq, Gemma's embed_scale) real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(store.text_config, dtype=dtype)
    model.eval()
    # Fused kernels would bypass the fp16-safe Linear hooks. Both bind to modules: fine on meta weights.
    applied = apply_kernels(model, torch_device, "torch" if safe or gguf else kernels)
    if isinstance(store, GgufStore):
        applied["kernels_reason"] = "GGUF blocks expand in transformers' own Linears"
        store.bind(model, torch_device, dtype)
    if safe:
        applied["kernels_reason"] = "the fp16-safe path runs transformers' own modules"
        Fp16Safe(model)
    layers = model.get_decoder().layers
    # A slot holds what crosses: a GGUF layer's blocks and norms, a safetensors layer at the compute dtype.
    layer_bytes = (max(store.layer_nbytes_as(dtype)) if gguf else
                   max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers))
    # The plan counts every layer at the compute dtype, fast or not: that is what sits on the device while
    # it computes; a fast layer's packed parts and its expansion temporaries are a row of their own.
    quant = store.variant.spec if store.variant is not None else QuantSpec(4, 64)
    shape = shape_from_path(model_dir)   # a folder's config + headers, or the GGUF's header
    memory = make_plan(shape, runtime_profile(torch_device, device_memory_bytes),
                       PlanRequest(batch=batch_size, context=context_tokens, dtype=dtype_name(dtype), kv_cache=kv_cache,
                                   attention=getattr(model.config, "_attn_implementation", None) or "sdpa",
                                   fp16_safe=safe, prefetch=prefetch, variant=variant, keep_precise=keep_precise,
                                   bits=quant.bits, group_size=quant.group_size, vram_budget_bytes=vram_budget_bytes,
                                   ram_budget_bytes=ram_budget_bytes), Path(model_dir).name)
    if not memory.fits:
        raise BudgetError(f"model {Path(model_dir).name}: {memory.reason}")
    if memory.streaming_slots == 1 and prefetch:
        logger.warning("the device fits one streaming slot only: prefetch is off, reads will not overlap compute")
    plan = StreamPlan(len(layers), layer_bytes, memory.resident_layers, memory.streaming_slots,
                      memory.ram_cache_layers)
    choice = [PRECISE] * plan.num_layers
    if variant != PRECISE:
        # GgufStore.open_variant refused every variant but precise above: fast layers come from a folder.
        assert isinstance(store, ModelStore)
        choice = choose_variants(plan.num_layers, store.layer_nbytes, store.layer_nbytes_fast, variant,
                                 keep_precise=keep_precise, stream_bytes_budget=stream_bytes_budget,
                                 resident_layers=plan.resident_layers)
        if FAST not in choice and plan.resident_layers == plan.num_layers:
            logger.warning("--variant %s kept every layer precise: all are resident under the VRAM budget, "
                           "and fast layers only save reads for streamed ones", variant)
        # The RAM cache holds packed parts for fast layers, so it fits more of them.
        host_bytes = bytes_by_choice(choice, store.layer_nbytes_as(dtype),
                                     store.layer_nbytes_fast_as(dtype))[plan.resident_layers:]
        if ram_budget_bytes and host_bytes:
            plan = dataclasses.replace(plan, ram_cache_layers=min(len(host_bytes), ram_budget_bytes // max(host_bytes)))
    logger.info("streaming %s: %d layers of %s, %d resident, %d slots, %d cached in RAM, variants %s",
                model_dir, plan.num_layers, format_size(layer_bytes), plan.resident_layers,
                plan.streaming_slots, plan.ram_cache_layers, summary(choice))
    if isinstance(store, GgufStore):
        tokenizer = store.tokenizer()  # the non-layer weights were placed by bind()
        for layer in layers[:memory.expanded_layers]:
            keep_expanded(layer)
        head = model.get_output_embeddings()
        if memory.expanded_head and isinstance(head, BlockHead):
            head.keep_expanded()
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        _load_non_layer(model, store, torch_device, dtype)
    streamer = LayerStreamer(store, layers, plan, torch_device, dtype, prefetch, choice,  # thread starts last
                             engine=engine_for(torch_device, engine))
    loaded = StreamedModel(model, tokenizer, torch_device, store, streamer, applied, fp16_safe=safe)
    loaded.plan = memory
    return loaded


def _load_non_layer(model: Any, store: ModelStore, device: torch.device, dtype: torch.dtype) -> None:
    """Embeddings, final norm and lm_head stay on the device for the model's lifetime (`model`: a transformers
    causal LM)."""
    tensors = store.read_non_layer(dtype, narrow_only=device.type == "cuda")  # converted on the card
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            logger.warning("ignoring checkpoint tensor %s: the model has no such module", name)
            continue
        assign_tensors({name: (owner, attr, None)}, {name: to_device_as(tensor, device, dtype)})
    head = model.get_output_embeddings()
    if head is not None and "lm_head.weight" not in tensors:
        if not any(getattr(c, "tie_word_embeddings", False) for c in (store.text_config, store.config)):
            raise ModelFolderError(f"the safetensors in {store.model_dir} lack lm_head.weight and config.json "
                                   "does not tie it to the embeddings")
        # Tied embeddings (Gemma): the checkpoint stores the matrix once.
        head.weight = model.get_input_embeddings().weight
    for module in model.modules():
        for attr, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[attr] = buf.to(device)  # rotary inv_freq, embed_scale, ...
    layers = set(id(p) for p in model.get_decoder().layers.parameters())
    missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in layers]
    if missing:
        raise ModelFolderError(f"the safetensors in {store.model_dir} lack {', '.join(missing[:5])}")
