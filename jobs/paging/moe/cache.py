"""Byte-budgeted device cache of MoE experts (any family the pager supports): preallocated slots, LRU or LFU, counters.

Owns which expert sits in which device slot, the host->device copies and the paging statistics.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, defaultdict
from typing import Any

import torch

from jobs.contract.errors import BudgetError
from jobs.contract.units import format_size
from jobs.paging.copy_engine import CopyEngine
from jobs.paging.moe.store import ExpertStore

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu")
SCOPES = ("global", "per_layer")
COUNTERS = ("hits", "misses", "prefetches", "prefetch_hits", "evictions", "bytes_h2d", "stall_s",
            "cpu_execs", "prefetch_guesses", "prefetch_guess_hits")


def cache_capacity(expert_cache_bytes: int, expert_bytes: int, num_layers: int,
                   scope: str = "global") -> int:
    """Slots that fit the budget; BudgetError before any allocation when not even one fits."""
    if scope not in SCOPES:
        raise ValueError(f"unknown cache scope {scope!r}: use one of {', '.join(SCOPES)}")
    needed_bytes = expert_bytes * (num_layers if scope == "per_layer" else 1)
    if expert_cache_bytes < needed_bytes:
        raise BudgetError(
            f"expert_cache_bytes={expert_cache_bytes} ({format_size(expert_cache_bytes)}) cannot "
            f"hold one expert of {expert_bytes} bytes ({format_size(expert_bytes)})"
            + (f" per layer ({needed_bytes} bytes for {num_layers} layers)"
               if scope == "per_layer" else "")
            + f"; give at least {needed_bytes} bytes")
    slots = expert_cache_bytes // expert_bytes
    return slots - slots % num_layers if scope == "per_layer" else slots


class ExpertCache:
    """Experts resident in preallocated device slots; the store's copy is the truth, never written.

    On CUDA, copies run non-blocking on a side stream and each slot has a "ready" event, so the
    compute stream waits only for the expert it is about to use, and a "free" event, so a slot is
    not overwritten while a kernel still reads it. On CPU the copies are plain and synchronous;
    the bookkeeping is the same, which is what the CPU tests check. Streams and events go through the
    store's copy engine (jobs.paging.copy_engine): CUDA's, or on CPU the checked thread engine, which runs
    the CUDA path.
    """

    def __init__(self, store: ExpertStore, expert_cache_bytes: int, *, device="cpu",
                 policy: str = "lru", scope: str = "global"):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.store = store
        self.device = torch.device(device)
        self.policy = policy
        self.scope = scope
        self.expert_bytes = store.expert_bytes
        all_experts = store.num_layers * store.num_experts
        self.capacity = min(cache_capacity(expert_cache_bytes, self.expert_bytes,
                                           store.num_layers, scope), all_experts)
        self.expert_cache_bytes = expert_cache_bytes
        # One allocation up front: the budget is enforced by construction, not by checks later.
        # Slots hold what the store holds (compute-dtype weights, or a 4-bit store's uint8 bytes).
        self._slots = torch.empty(self.capacity, store.slot_numel, dtype=store.slot_dtype, device=self.device)
        n_parts = store.num_layers if scope == "per_layer" else 1
        # per_layer: one partition per MoE layer (a dense layer mixed in has none)
        self._part_of = {layer: i for i, layer in enumerate(store.layers)} if n_parts > 1 else {}
        per_part = self.capacity // n_parts
        self._free = [list(range(p * per_part, (p + 1) * per_part)) for p in range(n_parts)]
        self._resident: list[OrderedDict[Key, int]] = [OrderedDict() for _ in range(n_parts)]
        self._uses: Counter[Key] = Counter()   # LFU frequency, kept across evictions
        self._protected: set[Key] = set()      # in use by the layer now computing
        self._prefetched: set[Key] = set()     # copied ahead and not yet used
        self._engine: CopyEngine | None = store.engine  # one engine for the store's staging and the cache's slots
        self._stream = self._engine.new_stream() if self._engine is not None else None
        self._ready: dict[int, Any] = {}   # slot -> event after its copy in (the engine's)
        self._freed: dict[int, Any] = {}   # slot -> event after its last reader
        # (layer, begin, end): timing events around the compute stream's wait for a copy still in flight;
        # read in stats(), so a stall costs the host no sync where it happens.
        self._stalls: list[tuple[int, Any, Any]] = []
        # Per layer: counts (int) and seconds (float); a missing counter reads 0, as a Counter's would.
        self._per_layer: defaultdict[int, defaultdict[str, float]] = defaultdict(lambda: defaultdict(int))
        log.info("expert cache: %d slots x %s = %s on %s (%s, %s)", self.capacity,
                 format_size(self.expert_bytes), format_size(self.allocated_bytes), self.device,
                 policy, scope)

    # -- accounting -------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return self._slots.numel() * self._slots.element_size()

    @property
    def resident_bytes(self) -> int:
        return sum(len(r) for r in self._resident) * self.expert_bytes

    def slots_for(self, layer: int) -> int:
        """How many experts of `layer` can be resident at once."""
        return self.capacity // len(self._resident)

    def is_resident(self, key: Key) -> bool:
        return key in self._part(key)

    def resident_keys(self) -> list[Key]:
        return [k for part in self._resident for k in part]

    def count(self, layer: int, name: str, amount: float = 1) -> None:
        self._per_layer[layer][name] += amount

    def stats(self) -> dict:
        self._settle_stalls(wait=True)
        per_layer = {layer: {name: c[name] for name in COUNTERS}
                     for layer, c in sorted(self._per_layer.items())}
        totals = {name: sum(c[name] for c in per_layer.values()) for name in COUNTERS}
        lookups = totals["hits"] + totals["misses"]
        return {
            **totals,
            "hit_rate": totals["hits"] / lookups if lookups else 0.0,
            # Without the hits that a prefetch copy bought: what the policy alone achieved.
            "hit_rate_without_prefetch": ((totals["hits"] - totals["prefetch_hits"]) / lookups
                                          if lookups else 0.0),
            "prefetch_accuracy": (totals["prefetch_guess_hits"] / totals["prefetch_guesses"]
                                  if totals["prefetch_guesses"] else 0.0),
            "policy": self.policy, "scope": self.scope,
            "capacity_experts": self.capacity, "expert_bytes": self.expert_bytes,
            "expert_cache_bytes": self.expert_cache_bytes,
            "allocated_bytes": self.allocated_bytes, "resident_bytes": self.resident_bytes,
            "per_layer": per_layer,
        }

    def reset_stats(self) -> None:
        self._settle_stalls(wait=True)
        self._per_layer.clear()

    # -- paging -----------------------------------------------------------------------------
    def fetch(self, key: Key, *, prefetch: bool = False) -> bool:
        """Make `key` resident (copy issued, maybe still in flight). A demand fetch counts a hit
        or a miss and a use; a prefetch counts only the copy it issues. Returns False when a
        prefetch found no slot it may take (everything protected)."""
        part = self._part(key)
        layer = key[0]
        if key in part:
            if not prefetch:
                self.count(layer, "hits")
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.count(layer, "prefetch_hits")
                self._touch(key)
            return True
        slot = self._take_slot(key)
        if slot is None:
            if prefetch:
                return False
            raise RuntimeError(f"expert cache: every slot is in use, cannot page in {key}")
        if prefetch:
            self.count(layer, "prefetches")
            self._prefetched.add(key)
        else:
            self.count(layer, "misses")
            self._uses[key] += 1
        part[key] = slot
        self._copy_in(key, slot, demand=not prefetch)
        return True

    def note_cpu_exec(self, key: Key) -> None:
        """A miss the caller ran on the host copy instead of paging it in."""
        self.count(key[0], "misses")
        self.count(key[0], "cpu_execs")
        self._uses[key] += 1

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) of the slot (views, or dequantized from a 4-bit slot on the device);
        the compute stream waits for its copy only."""
        slot = self._part(key)[key]
        ready = self._ready.pop(slot, None)
        engine = self._engine
        if ready is not None:
            assert engine is not None  # only an engine's copies come with an event
            compute = engine.compute_stream()
            if engine.done(ready):
                engine.wait(compute, ready, "expert ready")
            else:  # still copying: the compute stream waits on the device, the host runs on (no sync here)
                begin = engine.record(compute, timing=True)
                engine.wait(compute, ready, "expert ready")
                end = engine.record(compute, timing=True)
                self._stalls.append((key[0], begin, end))
                if len(self._stalls) > 1024:
                    self._settle_stalls(wait=False)
        if engine is not None:
            engine.reads(engine.compute_stream(), [("expert slot", slot)])
        return self.store.expand(self._slots[slot], key)

    def _settle_stalls(self, *, wait: bool) -> None:
        """Add the compute stream's waits to stall_s: all of them (`wait`: stats time), or those finished."""
        pending = []
        engine = self._engine
        for layer, begin, end in self._stalls:
            assert engine is not None  # stalls are timed with an engine's events
            if wait:
                engine.host_wait(end, "stall timing")
            elif not engine.done(end):
                pending.append((layer, begin, end))
                continue
            self.count(layer, "stall_s", engine.elapsed_s(begin, end))
        self._stalls = pending

    def protect(self, key: Key) -> None:
        self._protected.add(key)

    def release(self, key: Key) -> None:
        """The compute that read `key` is queued; its slot may be reused after it finishes."""
        self._protected.discard(key)
        engine = self._engine
        if engine is not None and key in self._part(key):
            self._freed[self._part(key)[key]] = engine.record(engine.compute_stream())

    def close(self) -> None:
        engine = self._engine
        if engine is not None and self._stream is not None:
            engine.stream_sync(self._stream, "expert cache close")
            self._stalls.clear()
            # The slots were allocated on the compute stream: freeing them is ordered after its kernels.
            engine.frees([("expert slot", slot) for slot in range(self.capacity)], pool=engine.compute_stream())
        for part in self._resident:
            part.clear()
        self._slots = torch.empty(0, device=self.device)

    # -- internals --------------------------------------------------------------------------
    def _part(self, key: Key) -> OrderedDict[Key, int]:
        return self._resident[self._part_of.get(key[0], 0)]

    def _touch(self, key: Key) -> None:
        self._part(key).move_to_end(key)
        self._uses[key] += 1

    def _take_slot(self, key: Key) -> int | None:
        free = self._free[self._part_of.get(key[0], 0)]
        if free:
            return free.pop(0)
        victim = self._victim(self._part(key))
        if victim is None:
            return None
        self.count(victim[0], "evictions")
        self._prefetched.discard(victim)
        return self._part(victim).pop(victim)

    def _victim(self, part: OrderedDict[Key, int]) -> Key | None:
        """LRU: least recently used. LFU: fewest uses so far, ties to the least recent."""
        candidates = [k for k in part if k not in self._protected]  # oldest first
        if not candidates:
            return None
        if self.policy == "lru":
            return candidates[0]
        return min(candidates, key=lambda k: self._uses[k])  # min() keeps the first of ties

    def _copy_in(self, key: Key, slot: int, *, demand: bool) -> None:
        """The store copies the expert in: from its RAM arena, or read from the checkpoint (through its
        pinned staging ring on CUDA, straight into the slot on CPU)."""
        dst = self._slots[slot]
        self.count(key[0], "bytes_h2d", self.expert_bytes)
        engine, stream = self._engine, self._stream
        if engine is None or stream is None:
            # The CPU "device" copies synchronously; a demand copy is time compute waited.
            t0 = time.perf_counter()
            self.store.copy_to(key, dst)
            if demand:
                self.count(key[0], "stall_s", time.perf_counter() - t0)
            return
        freed = self._freed.pop(slot, None)
        if freed is not None:
            engine.wait(stream, freed, "expert slot freed")
        self.store.copy_to(key, dst, stream=stream, dst_buffer=("expert slot", slot))  # non-blocking, side stream
        self._ready[slot] = engine.record(stream)
