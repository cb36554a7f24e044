"""The layer streamer: materializes each decoder layer in a forward pre-hook (into a slot of the ring,
jobs.paging.dense.slots) and releases it in a forward hook; owns the prefetch thread, the RAM cache, the I/O
counters and expanding fast (quantized) layers on the device before they run. Streams and events go through a
copy engine (jobs.paging.copy_engine): CUDA's, or the checked thread engine on cpu."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from jobs.contract.errors import ModelFolderError
from jobs.paging.copy_engine import CopyEngine
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.dense.slots import SlotRing, layout, views
from jobs.paging.dense.variants import FAST, PRECISE, bytes_by_choice, summary
from jobs.paging.dtypes import to_device_as
from jobs.paging.pinned import HostArena
from jobs.paging.quant import dequantize_weight


@dataclass(frozen=True)
class StreamPlan:
    """The layer counts of a memplan.MemoryPlan the streamer acts on."""
    num_layers: int
    layer_bytes: int          # largest decoder layer at the compute dtype
    resident_layers: int      # layers 0..resident_layers-1 stay on the device after first use
    streaming_slots: int      # layers in flight besides the resident ones: 2 with prefetch, else 1
    ram_cache_layers: int     # streamed layers whose host copy is kept between passes


class LayerSource(Protocol):
    """What the streamer reads of every store, a safetensors folder (ModelStore) or a GGUF file (GgufStore).
    Fast layers exist only in a folder's quantized variant: for those it needs a ModelStore."""

    model_dir: Path

    @property
    def layer_entries(self) -> Sequence[Mapping[str, object]]: ...   # per layer: checkpoint name -> entry

    @property
    def layer_nbytes(self) -> list[int]: ...

    def read_layer(self, index: int, dtype: torch.dtype, *, pin: bool = False,
                   narrow_only: bool = False) -> dict[str, torch.Tensor]: ...

    def read_layer_into(self, index: int, out: dict[str, torch.Tensor], *, fast: bool = False) -> None: ...


class LayerStreamer:
    """Materializes each decoder layer in a forward pre-hook and releases it in a forward hook."""

    def __init__(self, store: LayerSource, layers: nn.ModuleList, plan: StreamPlan,
                 device: torch.device, dtype: torch.dtype, prefetch: bool,
                 variants: list[str] | None = None, engine: CopyEngine | None = None) -> None:
        """`engine`: copy_engine.engine_for(device): CUDA's on a GPU; on cpu None (layers compute where they were
        read) or a ThreadEngine, which runs the GPU's path (slots, staging ring, cache arena, side stream)."""
        self.store, self.layers, self.plan = store, layers, plan
        self.device, self.dtype = device, dtype
        self.variants = variants or [PRECISE] * plan.num_layers
        precise_bytes = store.layer_nbytes
        fast_bytes = self._fast_store().layer_nbytes_fast if FAST in self.variants else precise_bytes
        # What one pass reads from disk with the RAM cache cold: every streamed layer in its variant.
        per_layer = bytes_by_choice(self.variants, precise_bytes, fast_bytes)
        self.bytes_read_per_pass = sum(per_layer[plan.resident_layers:])
        self._cuda = device.type == "cuda"
        self._engine = engine
        self._slots = _layer_slots(layers, store)
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        # Fill-and-keep rather than LRU: passes scan layers cyclically, where LRU would always miss.
        self._ram_cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._materialized: set[int] = set()
        self._lock = threading.Lock()
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="layer-prefetch")
                          if prefetch and plan.streaming_slots >= 2 else None)
        self._side_stream = engine.new_stream() if engine is not None else None
        # Where a streamed layer's tensors sit in a slot, at the compute dtype (slots.layout).
        self._layouts = [layout({n: (meta.shape, dtype if meta.is_floating_point() else meta.dtype)
                                 for n, (_, _, meta) in self._slots[i].items()})
                         for i in range(plan.num_layers)]
        slot_bytes = max((size for parts, size in self._layouts[plan.resident_layers:]), default=0)
        # A fast layer as it crosses: packed parts as stored, the rest in the compute dtype.
        self._fast_layouts = {i: layout({n: (shape, stored if n in self._packed_names(i) or not stored.is_floating_point
                                             else dtype)
                                         for n, (shape, stored) in self._fast_store().layer_parts(i, fast=True).items()})
                              for i, v in enumerate(self.variants) if v == FAST}
        crossing = [self._fast_layouts[i][1] if i in self._fast_layouts else self._layouts[i][1]
                    for i in range(plan.num_layers)]
        packed_bytes = max((self._fast_layouts[i][1] for i in self._fast_layouts if i >= plan.resident_layers),
                           default=0)
        # Device slot = [expanded layer | packed parts of a fast layer]; the staging buffer holds what crosses.
        self._ring = (SlotRing(plan.streaming_slots, slot_bytes + packed_bytes, device,
                               staging_bytes=max(slot_bytes, packed_bytes), engine=engine)
                      if plan.streaming_slots else None)
        self._slot_of: dict[int, int] = {}
        self._expanded_bytes = slot_bytes
        # With an engine (CUDA) the RAM cache is one exact pinned arena (no power-of-two rounding per tensor), sized
        # for the largest streamed layers as they cross.
        cached = sorted(crossing[plan.resident_layers:], reverse=True)[:plan.ram_cache_layers]
        self._cache_arena = (HostArena(sum(cached), pin=self._cuda, what="RAM cache")
                             if engine is not None and plan.ram_cache_layers else None)
        self._cache_reserved = 0
        self.bytes_h2d = 0
        self.io_wait_s = 0.0
        self.max_materialized = 0
        self._hooks = []
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(index)))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(index)))

    def _fast_store(self) -> ModelStore:
        """The store, where fast layers are involved: only a safetensors folder has them (GgufStore.open_variant
        refuses every variant but precise, so a GGUF's layers are all precise)."""
        assert isinstance(self.store, ModelStore), "fast layers need a safetensors folder's variant"
        return self.store

    @property
    def _slot_ring(self) -> SlotRing:
        """The ring, where a slot is in hand: a layer gets a slot only when the plan streams some, which is
        when the ring exists."""
        assert self._ring is not None, "a streaming slot without a slot ring"
        return self._ring

    # -- hooks -------------------------------------------------------------------------------
    def _make_pre_hook(self, index: int):
        def pre_hook(module: nn.Module, args: Any) -> None:
            start = time.perf_counter()
            tensors, ready = self._take(index)
            engine = self._engine
            if ready is not None:
                assert engine is not None  # only an engine's copies come with an event
                engine.wait(engine.compute_stream(), ready, "slot ready")
            self.io_wait_s += time.perf_counter() - start
            if engine is not None:
                main = engine.compute_stream()
                if index not in self._slot_of:  # a resident layer: allocated on the side stream, used on main
                    engine.record_stream(tensors.values(), main, ("resident layer", index))
                engine.reads(main, [("slot", self._slot_of[index]) if index in self._slot_of
                                    else ("resident layer", index)])
            assign_tensors(self._slots[index], tensors)
            self._schedule_after(index)
        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if index < self.plan.resident_layers:
                return
            assign_tensors(self._slots[index], {name: meta for name, (_, _, meta) in self._slots[index].items()})
            self._release(index)
        return post_hook

    def _release(self, index: int) -> None:
        with self._lock:
            self._materialized.discard(index)
            slot = self._slot_of.pop(index, None)
        if slot is not None:  # free once the kernels queued so far (this layer's) have read it
            self._slot_ring.release(slot, self._engine.compute_stream() if self._engine is not None else None)

    def begin_pass(self) -> None:
        """A pass that raised left layers in their slots: give those slots back (prefetched ones stay)."""
        with self._lock:
            stale = [i for i in self._materialized if i not in self._pending and i in self._slot_of]
        for index in stale:
            assign_tensors(self._slots[index], {name: meta for name, (_, _, meta) in self._slots[index].items()})
            self._release(index)

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
        """A streamed layer waits for a free slot first: the host can never run further ahead than the plan."""
        slot = self._ring.acquire() if self._ring is not None and index >= self.plan.resident_layers else None
        try:
            tensors, ready = self._load_into(index, slot)
        except BaseException:
            if slot is not None:
                self._slot_ring.release(slot)
            raise
        with self._lock:
            if slot is not None:
                self._slot_of[index] = slot
            self._materialized.add(index)
            self.max_materialized = max(self.max_materialized, len(self._materialized))
        return tensors, ready

    def _load_into(self, index: int, slot: int | None) -> tuple[dict[str, torch.Tensor], Any]:
        """Host tensors from the RAM cache or disk, then on the device; runs on the prefetch thread.

        A fast layer's host copy (and RAM-cache entry) holds the packed parts: those are what crosses
        to the device, and bytes_h2d counts them; they are expanded to the compute dtype there.
        """
        fast = self.variants[index] == FAST
        host = self._ram_cache.get(index)
        if host is None and slot is not None:
            with self._lock:  # the caller's thread may load a layer while the prefetch thread does
                keep = self._cache_reserved < self.plan.ram_cache_layers
                self._cache_reserved += keep
            if not keep:
                return self._read_to_slot(index, slot, fast)
        if host is None:
            keep = slot is not None  # reserved above
            read = self._fast_store().read_layer_fast if fast else self.store.read_layer
            # Stored wider than the compute dtype: narrowed at read; otherwise converted into the cache arena.
            host = read(index, self.dtype, pin=False, narrow_only=self._cuda)
            if keep:
                host = self._cache_copy(index, host)
                with self._lock:  # stats() reads the cache from the caller's thread
                    self._ram_cache[index] = host
        copied = sum(t.numel() * t.element_size() for t in host.values())
        with self._lock:
            self.bytes_h2d += copied
        engine = self._engine
        if engine is None:
            # On cpu the host tensors are what the layer computes with; a fast layer is expanded
            # here, on the prefetch thread when there is one, into new tensors (the cache keeps packed).
            return (self._dequantize(index, host) if fast else host), None
        if slot is None:  # a resident layer: its own allocation, for the model's lifetime
            tensors: dict[str, torch.Tensor] = {}  # filled on the side stream; read after the compute stream waits

            def copy_resident() -> None:
                if fast:   # packed parts cross as stored and expand on the device
                    moved = self._dequantize(index, {k: t.to(self.device, non_blocking=True) for k, t in host.items()})
                    tensors.update({k: t.to(self.dtype) if t.is_floating_point() else t for k, t in moved.items()})
                else:      # converted a chunk at a time into the layer's own tensors: no second copy (#29)
                    tensors.update({k: to_device_as(t, self.device, self.dtype, non_blocking=True)
                                    for k, t in host.items()})
            buffer = ("resident layer", index)
            engine.run(self._side_stream, copy_resident, allocates=[buffer], writes=[buffer])
            return tensors, engine.record(self._side_stream)
        self._slot_ring.before_copy_in(slot, self._side_stream)  # a cached layer: after the slot's last reader
        return self._copy_to_slot(index, slot, host, fast, ("ram cache", index))

    def _read_to_slot(self, index: int, slot: int, fast: bool) -> tuple[dict[str, torch.Tensor], Any]:
        """A streamed layer not kept in RAM: straight from the page cache into the slot (cpu) or the slot's
        pinned staging buffer (CUDA), converted on the way; no host tensor is allocated."""
        ring = self._slot_ring
        parts = self._crossing(index)
        nbytes = sum(p.nbytes for p in parts)
        with self._lock:
            self.bytes_h2d += nbytes
        if self._engine is not None:
            ring.before_copy_in(slot, self._side_stream)  # the staging buffer's last copy has left it
            self._engine.host_writes([("staging", slot)])
            staged = views(ring.staging_buffers[slot], parts)
            self.store.read_layer_into(index, staged, fast=fast)
            return self._copy_to_slot(index, slot, staged, fast, ("staging", slot))
        buffer = ring.device_buffers[slot]
        out = views(buffer, self._layouts[index][0])
        if fast:
            packed = views(buffer[self._expanded_bytes:], parts)
            self.store.read_layer_into(index, packed, fast=True)
            self._expand_into(index, packed, out)
        else:
            self.store.read_layer_into(index, out)
        return out, None

    def _copy_to_slot(self, index: int, slot: int, src: dict[str, torch.Tensor], fast: bool, src_buffer: tuple):
        """Pinned source (`src_buffer`: the cache arena, or the slot's staging buffer, laid out as the layer
        crosses) -> the slot's device buffer on the side stream, which the caller made wait for the slot's last
        reader (SlotRing.before_copy_in); a fast layer expands inside the slot."""
        ring, side = self._slot_ring, self._side_stream
        parts = self._layouts[index][0]
        device_slot = ring.device_buffers[slot]
        out = views(device_slot, parts)

        def copy_in() -> None:
            if fast:
                packed = views(device_slot[self._expanded_bytes:], self._crossing(index))
                for k, t in src.items():
                    packed[k].copy_(t, non_blocking=True)
                self._expand_into(index, packed, out)
            else:
                for k, t in src.items():
                    out[k].copy_(t, non_blocking=True)
        assert self._engine is not None  # only an engine copies into slots
        self._engine.run(side, copy_in, reads=[src_buffer], writes=[("slot", slot)])
        return out, ring.after_copy_in(slot, side)

    def _packed_names(self, index: int) -> set[str]:
        if self.variants[index] != FAST:
            return set()
        store = self._fast_store()
        return {n for n in store.fast_entries[index] if n.rpartition(".")[0] in store.fast_shapes[index]}

    def _cache_copy(self, index: int, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On CUDA a cached layer lives in the pinned cache arena, laid out as it crosses; on cpu the host
        tensors are kept."""
        if self._cache_arena is None:
            return host
        parts, size = self._fast_layouts[index] if index in self._fast_layouts else self._layouts[index]
        with self._lock:
            block = self._cache_arena.take(size)
        if self._engine is not None:
            self._engine.host_writes([("ram cache", index)])
        out = views(block, parts)
        for name, t in host.items():
            out[name].copy_(t)  # converting to the compute dtype where the layer is stored wider or other
        return out

    def _crossing(self, index: int) -> list:
        """Layer `index` as it crosses (slots.Part list): a fast layer's packed parts as stored, the rest in the
        compute dtype."""
        return self._fast_layouts[index][0] if index in self._fast_layouts else self._layouts[index][0]

    def _dequantize(self, index: int, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed NAME.W_q/.scale/.zero become NAME in the compute dtype; other tensors pass through. All
        at once: for a layer whose expanded weights all stay (cpu without slots, a resident layer)."""
        return dict(self._dequantized(index, parts))

    def _dequantized(self, index: int, parts: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """As _dequantize, one weight at a time: a caller that copies each into its slot and drops it before
        the next holds one expanded matrix at most, which is what the memory plan counts (#29)."""
        store = self._fast_store()
        assert store.variant is not None  # fast layers were chosen after open_variant() opened it
        spec = store.variant.spec
        for name, tensor in parts.items():
            weight, _, part = name.rpartition(".")
            shape = store.fast_shapes[index].get(weight)
            if shape is None:
                yield name, tensor
            elif part == "W_q":
                yield weight, dequantize_weight({p: parts[f"{weight}.{p}"] for p in ("W_q", "scale", "zero")},
                                                shape, spec, self.dtype)

    def _expand_into(self, index: int, packed: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        """A fast layer's packed parts expanded into its slot's views, one matrix alive at a time."""
        for name, tensor in self._dequantized(index, packed):
            out[name].copy_(tensor)
            del tensor   # before the next weight expands

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
            "max_slots_in_use": self._ring.max_in_use if self._ring else 0,
            "slot_device_bytes": self._ring.device_bytes if self._ring else 0,
            "pinned_bytes": ((self._ring.pinned_bytes if self._ring else 0)
                             + (self._cache_arena.pinned_bytes if self._cache_arena else 0)),
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
            with self._lock:  # a prefetch blocked on a slot that a raised pass still holds must get one
                held = list(self._slot_of.items())
                self._slot_of.clear()
            for _, slot in held:
                self._slot_ring.release(slot)
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pending.clear()
        cached = list(self._ram_cache)
        self._ram_cache.clear()
        if self._ring is not None:
            self._ring.close()  # waits for every copy out of the cache arena too: each went into a slot
        if self._cache_arena is not None:
            if self._engine is not None:
                self._engine.frees([("ram cache", index) for index in cached])
            self._cache_arena.close()


def _layer_slots(layers: nn.ModuleList, store: LayerSource) -> list[dict[str, tuple]]:
    """Per layer: checkpoint name -> (owning module, attribute, meta placeholder); strict both ways."""
    slots = []
    for index, layer in enumerate(layers):
        wanted: dict[str, torch.Tensor] = {n: t for n, t in layer.named_parameters()}
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


def assign_tensors(slots: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    """Swap tensors into the modules without copying (gpt-fast's assign=True, per tensor)."""
    for name, tensor in tensors.items():
        owner, attr, _ = slots[name]
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor
