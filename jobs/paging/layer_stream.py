"""Runs a transformers causal LM whose decoder layers are streamed from safetensors during forward.

Owns the budget plan (resident / streaming / RAM-cached layers), the prefetch thread, the I/O counters,
and expanding fast (quantized) layers on the device before they run.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.errors import BudgetError, KernelError, ModelFolderError
from jobs.paging.dtypes import dtype_name
from jobs.paging.kernels import apply_kernels
from jobs.paging.model_store import ModelStore
from jobs.paging.numerics import Fp16Safe, resolve_numerics
from jobs.paging.quant import QuantSpec, dequantize_weight
from jobs.paging.variants import DEFAULT_KEEP_PRECISE, FAST, PRECISE, bytes_by_choice, choose_variants, summary
from jobs.spec import VARIANT_MODES
from jobs.units import format_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlan:
    num_layers: int
    layer_bytes: int          # largest decoder layer at the compute dtype
    resident_layers: int      # layers 0..resident_layers-1 stay on the device after first use
    streaming_slots: int      # layers in flight besides the resident ones: 2 with prefetch, else 1
    ram_cache_layers: int     # streamed layers whose host copy is kept between passes


def plan_budget(num_layers: int, layer_bytes: int, vram_budget_bytes: int | None,
                ram_budget_bytes: int | None, prefetch: bool) -> StreamPlan:
    """Split the budgets into layer counts; BudgetError when not even one layer fits."""
    ram_layers = (ram_budget_bytes or 0) // layer_bytes
    if vram_budget_bytes is None or vram_budget_bytes >= num_layers * layer_bytes:
        return StreamPlan(num_layers, layer_bytes, num_layers, 0, 0)
    if vram_budget_bytes < layer_bytes:
        raise BudgetError(
            f"vram budget {vram_budget_bytes} bytes ({format_size(vram_budget_bytes)}) cannot hold one decoder "
            f"layer, which needs {layer_bytes} bytes ({format_size(layer_bytes)}); raise the budget to at least "
            f"{layer_bytes} bytes ({2 * layer_bytes} to overlap reading with compute)"
        )
    # Prefetch needs a second slot: the next layer lands while the current one computes.
    slots = 2 if prefetch and vram_budget_bytes >= 2 * layer_bytes else 1
    if prefetch and slots == 1:
        logger.warning("vram budget fits one layer only: prefetch is off, reads will not overlap compute")
    resident = min(num_layers - 1, (vram_budget_bytes - slots * layer_bytes) // layer_bytes)
    streamed = num_layers - resident
    return StreamPlan(num_layers, layer_bytes, resident, slots, min(ram_layers, streamed))


class LayerStreamer:
    """Materializes each decoder layer in a forward pre-hook and releases it in a forward hook."""

    def __init__(self, store: ModelStore, layers: nn.ModuleList, plan: StreamPlan,
                 device: torch.device, dtype: torch.dtype, prefetch: bool,
                 variants: list[str] | None = None) -> None:
        self.store, self.layers, self.plan = store, layers, plan
        self.device, self.dtype = device, dtype
        self.variants = variants or [PRECISE] * plan.num_layers
        precise_bytes = store.layer_nbytes
        fast_bytes = store.layer_nbytes_fast if FAST in self.variants else precise_bytes
        # What one pass reads from disk with the RAM cache cold: every streamed layer in its variant.
        per_layer = bytes_by_choice(self.variants, precise_bytes, fast_bytes)
        self.bytes_read_per_pass = sum(per_layer[plan.resident_layers:])
        self._cuda = device.type == "cuda"
        self._slots = _layer_slots(layers, store)
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        # Fill-and-keep rather than LRU: passes scan layers cyclically, where LRU would always miss.
        self._ram_cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._materialized: set[int] = set()
        self._lock = threading.Lock()
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="layer-prefetch")
                          if prefetch and plan.streaming_slots >= 2 else None)
        self._side_stream = torch.cuda.Stream(device) if self._cuda else None
        self.bytes_h2d = 0
        self.io_wait_s = 0.0
        self.max_materialized = 0
        self._hooks = []
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(index)))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(index)))

    # -- hooks -------------------------------------------------------------------------------
    def _make_pre_hook(self, index: int):
        def pre_hook(module: nn.Module, args: Any) -> None:
            start = time.perf_counter()
            tensors, ready = self._take(index)
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            self.io_wait_s += time.perf_counter() - start
            if self._cuda:
                main = torch.cuda.current_stream(self.device)
                for t in tensors.values():
                    t.record_stream(main)  # allocated on the side stream, freed after main-stream use
            _assign(self._slots[index], tensors)
            self._schedule_after(index)
        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if index < self.plan.resident_layers:
                return
            _assign(self._slots[index], {name: meta for name, (_, _, meta) in self._slots[index].items()})
            with self._lock:
                self._materialized.discard(index)
        return post_hook

    # -- loading -----------------------------------------------------------------------------
    def _take(self, index: int) -> tuple[dict[str, torch.Tensor], Any]:
        if index in self._resident:
            return self._resident[index], None
        future = self._pending.pop(index, None)
        tensors, ready = future.result() if future is not None else self._load(index)
        if index < self.plan.resident_layers:
            self._resident[index] = tensors
        return tensors, ready

    def _schedule_after(self, index: int) -> None:
        """Start reading the next layer that is not on the device yet (wrapping to the next pass)."""
        if self._executor is None:
            return
        for step in range(1, self.plan.num_layers + 1):
            nxt = (index + step) % self.plan.num_layers
            if nxt in self._resident:
                continue
            with self._lock:
                busy = nxt in self._pending or nxt in self._materialized
            if not busy:
                self._pending[nxt] = self._executor.submit(self._load, nxt)
            return

    def _load(self, index: int) -> tuple[dict[str, torch.Tensor], Any]:
        """Host tensors from the RAM cache or disk, then on the device; runs on the prefetch thread.

        A fast layer's host copy (and RAM-cache entry) holds the packed parts: those are what crosses
        to the device, and bytes_h2d counts them; they are expanded to the compute dtype there.
        """
        fast = self.variants[index] == FAST
        host = self._ram_cache.get(index)
        if host is None:
            read = self.store.read_layer_fast if fast else self.store.read_layer
            # On CUDA a layer crosses as stored (narrowed on the host only if stored wider than the compute
            # dtype) and the card converts it: a bf16 checkpoint on an fp16 card costs the CPU no conversion.
            host = read(index, self.dtype, pin=self._cuda, narrow_only=self._cuda)
            with self._lock:  # stats() reads the cache from the caller's thread
                if index >= self.plan.resident_layers and len(self._ram_cache) < self.plan.ram_cache_layers:
                    self._ram_cache[index] = host
        ready = None
        if self._cuda:
            with torch.cuda.stream(self._side_stream):
                tensors = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
                copied = sum(t.numel() * t.element_size() for t in tensors.values())
                if fast:
                    # On the side stream too, so expanding overlaps the previous layer's compute.
                    tensors = self._dequantize(index, tensors)
                tensors = {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in tensors.items()}
                ready = torch.cuda.Event()
                ready.record(self._side_stream)
        else:
            # On cpu the host tensors are what the layer computes with; a fast layer is expanded
            # here, on the prefetch thread when there is one, into new tensors (the cache keeps packed).
            copied = sum(t.numel() * t.element_size() for t in host.values())
            tensors = self._dequantize(index, host) if fast else host
        with self._lock:
            self.bytes_h2d += copied
            self._materialized.add(index)
            self.max_materialized = max(self.max_materialized, len(self._materialized))
        return tensors, ready

    def _dequantize(self, index: int, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed NAME.W_q/.scale/.zero become NAME in the compute dtype; other tensors pass through."""
        spec = self.store.variant.spec
        out = {}
        for name, tensor in parts.items():
            weight, _, part = name.rpartition(".")
            shape = self.store.fast_shapes[index].get(weight)
            if shape is None:
                out[name] = tensor
            elif part == "W_q":
                out[weight] = dequantize_weight({p: parts[f"{weight}.{p}"] for p in ("W_q", "scale", "zero")},
                                                shape, spec, self.dtype)
        return out

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            materialized = len(self._materialized)
            cached = list(self._ram_cache.values())
        return {
            "bytes_h2d": self.bytes_h2d,
            "io_wait_s": self.io_wait_s,
            "resident_layers": self.plan.resident_layers,
            "streamed_layers": self.plan.num_layers - self.plan.resident_layers,
            "streaming_slots": self.plan.streaming_slots,
            "layer_bytes_compute": self.plan.layer_bytes,
            "materialized_layers": materialized,
            "max_materialized_layers": self.max_materialized,
            "ram_cache_layers": len(cached),
            "ram_cache_bytes": sum(t.numel() * t.element_size() for layer in cached for t in layer.values()),
            "prefetch": self._executor is not None,
            "variants": summary(self.variants),
            "fast_layers": self.variants.count(FAST),
            "precise_layers": self.variants.count(PRECISE),
            "bytes_read_per_pass": self.bytes_read_per_pass,
        }

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()
        self._ram_cache.clear()


def _layer_slots(layers: nn.ModuleList, store: ModelStore) -> list[dict[str, tuple]]:
    """Per layer: checkpoint name -> (owning module, attribute, meta placeholder); strict both ways."""
    slots = []
    for index, layer in enumerate(layers):
        wanted = {n: t for n, t in layer.named_parameters()}
        wanted.update({n: b for n, b in layer.named_buffers() if b.is_meta})
        have = set(store.layer_entries[index])
        if have != set(wanted):
            raise ModelFolderError(
                f"layer {index} in {store.model_dir} does not match the config: missing "
                f"{sorted(set(wanted) - have)[:5]}, unexpected {sorted(have - set(wanted))[:5]}"
            )
        layer_slots = {}
        for name, meta in wanted.items():
            owner_name, _, attr = name.rpartition(".")
            layer_slots[name] = (layer.get_submodule(owner_name), attr, meta)
        slots.append(layer_slots)
    return slots


def _assign(slots: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    """Swap tensors into the modules without copying (gpt-fast's assign=True, per tensor)."""
    for name, tensor in tensors.items():
        owner, attr, _ = slots[name]
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor


class StreamedModel:
    """A transformers causal LM plus tokenizer whose decoder layers stream from disk."""

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device,
                 store: ModelStore, streamer: LayerStreamer, kernels: dict[str, str] | None = None,
                 fp16_safe: bool = False) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.fp16_safe = fp16_safe  # numerics.Fp16Safe hooks are on the layers
        self._store, self._streamer = store, streamer
        self.kernels = kernels or {"kernels": "torch", "kernels_reason": "not applied"}
        self._passes = 0
        self._pass_s = 0.0
        self._pass_start = 0.0
        model.register_forward_pre_hook(self._pass_begin)
        model.register_forward_hook(self._pass_end)

    def _pass_begin(self, module: nn.Module, args: Any) -> None:
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


def load_streamed(model_dir: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto",
                  vram_budget_bytes: int | None = None, ram_budget_bytes: int | None = None,
                  prefetch: bool = True, variant: str = PRECISE, keep_precise: int = DEFAULT_KEEP_PRECISE,
                  stream_bytes_budget: int | None = None, variant_spec: QuantSpec | None = None,
                  kernels: str = "auto", fp16_safe: str = "auto") -> StreamedModel:
    """Open a decoder-only safetensors folder for layer streaming.

    vram_budget_bytes bounds the decoder layers on the device at once (None: no bound, all stay
    resident); embeddings, final norm, lm_head and the KV cache come on top of it.
    ram_budget_bytes bounds streamed layers kept in host RAM between passes (None: none).
    On cpu, "device" and host are the same memory: bytes_h2d then counts bytes handed to layers
    (packed bytes for fast layers).
    variant: "precise" (original weights), "fast" (the folder's quantized variant wherever it has
    one) or "auto" (variants.choose_variants: first/last keep_precise layers and the resident ones
    precise, the rest fast; stream_bytes_budget upgrades more layers while a pass's disk reads fit).
    Fast layers need `lab-attendant model quantize NAME --bits 4` to have run on the folder;
    variant_spec names the variant when the folder has several.
    kernels: "auto" patches Liger's fused kernels in on CUDA when installed, "liger" insists, "torch" never.
    dtype "auto" and fp16_safe: numerics.resolve_numerics (fp32 on cpu, bf16 from sm_80, fp16 below; the fp16-safe
    hooks in fp16 for models that overflow it, e.g. Gemma).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    store = ModelStore(model_dir)
    dtype, safe = resolve_numerics(dtype, fp16_safe, torch_device, store.text_config.model_type)
    if safe and kernels == "liger":
        raise KernelError("kernels = \"liger\" fuses the MLP and norms past the fp16-safe hooks: use kernels "
                          "\"torch\" or \"auto\", or dtype \"fp32\"/\"bf16\", or fp16_safe = \"off\"")
    if variant != PRECISE:
        if variant not in VARIANT_MODES:
            raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANT_MODES)}")
        store.open_variant(variant_spec)
    # include_buffers=False keeps non-persistent buffers (rotary inv_freq, Gemma's embed_scale) real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(store.text_config, dtype=dtype)
    model.eval()
    # Fused kernels would bypass the fp16-safe Linear hooks. Both bind to modules: fine on meta weights.
    applied = apply_kernels(model, torch_device, "torch" if safe else kernels)
    if safe:
        applied["kernels_reason"] = "the fp16-safe path runs transformers' own modules"
        Fp16Safe(model)
    layers = model.get_decoder().layers
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
    # The VRAM plan counts every layer at the compute dtype, fast or not: that is what sits on the
    # device while it computes (a fast layer's packed parts add ~30 % of a layer while it expands).
    plan = plan_budget(len(layers), layer_bytes, vram_budget_bytes, ram_budget_bytes, prefetch)
    choice = [PRECISE] * plan.num_layers
    if variant != PRECISE:
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
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _load_non_layer(model, store, torch_device, dtype)
    streamer = LayerStreamer(store, layers, plan, torch_device, dtype, prefetch, choice)  # thread starts last
    return StreamedModel(model, tokenizer, torch_device, store, streamer, applied, fp16_safe=safe)


def _load_non_layer(model: nn.Module, store: ModelStore, device: torch.device, dtype: torch.dtype) -> None:
    """Embeddings, final norm and lm_head stay on the device for the model's lifetime."""
    tensors = store.read_non_layer(dtype, narrow_only=device.type == "cuda")  # converted on the card
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            logger.warning("ignoring checkpoint tensor %s: the model has no such module", name)
            continue
        tensor = tensor.to(device)
        _assign({name: (owner, attr, None)}, {name: tensor.to(dtype) if tensor.is_floating_point() else tensor})
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
