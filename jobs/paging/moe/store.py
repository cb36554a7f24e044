"""Host-side expert store: up to ram_budget_bytes of experts in one exact-size arena (pinned on CUDA),
every other expert read on demand from the checkpoint's mmap through a small staging ring.

Owns finding each expert's tensors in a MoE safetensors folder (per-expert or fused keys, any family
plan/moe_layout.py describes) and serving an expert to the device cache or to the host, wherever it lives;
which experts stay in RAM is expert_budget's rule.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Hashable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from jobs.contract.errors import ModelFolderError
from jobs.contract.units import format_size
from jobs.paging.copy_engine import CopyEngine
from jobs.paging.mapped import MappedFiles
from jobs.paging.pinned import HostArena
from jobs.paging.plan.expert_budget import (
    STAGING_SLOTS,
    ExpertHostPlan,
    default_ram_budget_bytes,
    expert_host_plan,
    mem_available_bytes,
    resident_experts,
)
from jobs.paging.plan.moe_layout import FUSED_RE, PER_EXPERT_RE, PIECE_ORDER, ExpertLayout, expert_layout, is_expert_key

log = logging.getLogger(__name__)

__all__ = ["PER_EXPERT_RE", "CheckpointIndex", "ExpertStore", "expert_nbytes", "is_expert_key"]


class CheckpointIndex:
    """Which safetensors file holds each tensor; reads headers only, never whole shards."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._handles: dict[Path, safe_open] = {}
        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self.file_of = {k: self.model_dir / f for k, f in weight_map.items()}
        else:
            self.file_of = {}
            for path in sorted(self.model_dir.glob("*.safetensors")):
                with safe_open(path, framework="pt") as f:
                    self.file_of.update({k: path for k in f.keys()})
        if not self.file_of:
            raise FileNotFoundError(f"no *.safetensors weights in {self.model_dir}")

    def keys(self) -> list[str]:
        return list(self.file_of)

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or one row of its first axis, so a fused expert tensor is read per expert)."""
        path = self.file_of[name]
        if path not in self._handles:  # a shard header is parsed once, not once per tensor
            self._handles[path] = safe_open(path, framework="pt")
        f = self._handles[path]
        return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    def close(self) -> None:
        self._handles.clear()


def as_layout(config_or_layout) -> ExpertLayout:
    """An ExpertLayout as is, or the one a (Mixtral-style or other MoE) transformers config implies."""
    return config_or_layout if isinstance(config_or_layout, ExpertLayout) else expert_layout(config_or_layout)


def expert_numel(config) -> int:
    """Elements of one expert: gate_up [2I, H] followed by down [H, I]."""
    return as_layout(config).expert_numel


def expert_nbytes(config, dtype: torch.dtype) -> int:
    return expert_numel(config) * dtype.itemsize


def split_expert(flat: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (gate_up [2I, H], down [H, I]) into one flat expert buffer or device slot."""
    layout = as_layout(config)
    hidden, inter = layout.hidden, layout.intermediate
    n_gate_up = 2 * inter * hidden
    return flat[:n_gate_up].view(2 * inter, hidden), flat[n_gate_up:].view(hidden, inter)


Key = tuple[int, int]  # (layer, expert)


class Piece(NamedTuple):
    """One tensor (or fused row) of an expert in the checkpoint, and the elements of the flat expert
    buffer it fills; `raw`: copied as bytes (a 4-bit part), else converted to the compute dtype."""
    path: Path
    name: str
    row: int | None
    start: int
    end: int
    raw: bool = False


class ExpertStore:
    """Every expert of every layer, served read-only: from the arena when it is in RAM, else from the
    checkpoint through a staging slot. The checkpoint is the truth; nothing is written back."""

    def __init__(self, layout, dtype: torch.dtype, *, pin_memory: bool = False, engine: CopyEngine | None = None):
        """`layout`: an ExpertLayout (families.layout_of the built model) or a transformers config; `engine`: the
        copy engine the cache copies with (jobs.paging.copy_engine), None for plain synchronous copies."""
        self.layout = layout = as_layout(layout)
        self.dtype = dtype
        self.layers = layout.layers  # decoder layer indices with experts; keys are (layer, expert)
        self.num_layers = layout.num_layers
        self.num_experts = layout.num_experts
        self.expert_bytes = expert_nbytes(layout, dtype)
        self.variant = "precise"  # what the stats call the expert format; see expert_quant.py
        self.bits: float = dtype.itemsize * 8  # per weight as stored (GGUF blocks: e.g. 4.5 for Q4_K)
        self.pin_memory = pin_memory
        self.engine = engine
        # One expert's flat buffer (arena view, staging slot, device slot): its dtype and length.
        self.slot_dtype, self.slot_numel = dtype, layout.expert_numel
        self.ram_budget_bytes: int | None = None  # the budget in effect once loaded
        self._pieces: dict[Key, list[Piece]] = {}
        self._files = MappedFiles()
        self._arena: HostArena | None = None
        self._ram: dict[Key, torch.Tensor] = {}
        self._staging: list[torch.Tensor] = []
        self._staged_copy: list[Any] = []  # per slot: the engine's event after its last H2D copy, or None
        self._copy_streams: list[Any] = []  # the streams copies out of the arena were queued on
        self._next_staging = 0
        # Counts (int) and seconds (float); a missing counter reads 0, as a Counter's would.
        self._counters: defaultdict[str, float] = defaultdict(int)

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes

    # -- budget -----------------------------------------------------------------------------
    def resolve_ram_budget(self, ram_budget_bytes: int | None) -> int | None:
        """The budget in effect: the one given; on CUDA without one, what default_ram_budget_bytes
        allows (pinned pages cannot be swapped out); on CPU without one, no cap."""
        if ram_budget_bytes is not None or not self.pin_memory:
            return ram_budget_bytes
        available = mem_available_bytes()
        budget = default_ram_budget_bytes(self.total_experts, self.expert_bytes, available)
        log.info("expert store: no ram_budget_bytes on CUDA; pinning at most %s (all experts: %s, host "
                 "MemAvailable: %s)", format_size(budget) if budget is not None else "everything",
                 format_size(self.total_bytes), format_size(available) if available else "unknown")
        return budget

    def host_plan(self, ram_budget_bytes: int | None) -> ExpertHostPlan:
        """Experts in RAM, arena and staging bytes for a budget; BudgetError when the staging ring
        alone does not fit."""
        return expert_host_plan(self.total_experts, self.expert_bytes, ram_budget_bytes, STAGING_SLOTS)

    def check_budget(self, ram_budget_bytes: int | None) -> None:
        self.host_plan(ram_budget_bytes)

    # -- loading ----------------------------------------------------------------------------
    def load(self, index: CheckpointIndex, ram_budget_bytes: int | None = None) -> "ExpertStore":
        """Find every expert's tensors (headers only), then fill the arena's experts from the mmap."""
        self._pieces = self._find_pieces(index)
        self._fill(ram_budget_bytes)
        return self

    def _find_pieces(self, index: CheckpointIndex) -> dict[Key, list[Piece]]:
        per_expert: dict[tuple[int, int, int], str] = {}
        fused: dict[tuple[int, str], str] = {}
        for name in index.keys():
            if m := PER_EXPERT_RE.match(name):
                per_expert[(int(m[1]), int(m[2]), PIECE_ORDER[m[3]])] = name
            elif m := FUSED_RE.match(name):
                fused[(int(m[1]), m[2])] = name
        n_w = self.layout.intermediate * self.layout.hidden  # elements of gate, up or down
        pieces: dict[Key, list[Piece]] = {}
        for layer in self.layers:
            for expert in range(self.num_experts):
                found: list[tuple[str, int | None, int, int]]  # (tensor name, fused row, start, end)
                if (layer, "gate_up_proj") in fused and (layer, "down_proj") in fused:
                    found = [(fused[(layer, "gate_up_proj")], expert, 0, 2 * n_w),
                             (fused[(layer, "down_proj")], expert, 2 * n_w, 3 * n_w)]
                else:
                    found = []
                    for i in range(3):
                        piece_name = per_expert.get((layer, expert, i))
                        if piece_name is None:
                            raise KeyError(
                                f"checkpoint {index.model_dir} has no weights for layer {layer} expert {expert} "
                                f"(neither experts.{expert}.gate_proj/up_proj/down_proj or w1/w3/w2 nor fused "
                                "experts.gate_up_proj/down_proj); is config.json the one of these weights?")
                        found.append((piece_name, None, i * n_w, (i + 1) * n_w))
                pieces[(layer, expert)] = [Piece(index.file_of[name], name, row, start, end)
                                           for name, row, start, end in found]
                for p in pieces[(layer, expert)]:
                    self._check_piece(p)
        return pieces

    def _check_piece(self, p: Piece) -> None:
        dtype, shape, begin, end = self._files[p.path].entries[p.name]
        numel = (end - begin) // dtype.itemsize // (shape[0] if p.row is not None else 1)
        if numel != p.end - p.start or (p.row is not None and p.row >= shape[0]):
            raise ModelFolderError(f"{p.path}: {p.name} has shape {list(shape)}, not the "
                                   f"{p.end - p.start} elements per expert that config.json implies; "
                                   "the folder's weights and config.json do not match")

    def _fill(self, ram_budget_bytes: int | None) -> None:
        """One arena of exactly the plan's bytes (a refused pin leaves it pageable, the reason in stats' host_pin):
        the resident experts read into it, then the staging ring."""
        self.ram_budget_bytes = self.resolve_ram_budget(ram_budget_bytes)
        plan = self.host_plan(self.ram_budget_bytes)
        self._arena = arena = HostArena(plan.host_bytes, pin=self.pin_memory, what="expert store")
        for nth, expert in resident_experts(self.num_layers, self.num_experts, plan.experts_in_ram):
            key = (self.layers[nth], expert)
            self._ram[key] = self._take(arena)
            if self.engine is not None:
                self.engine.host_writes([("expert in RAM", key)])
            self._read(key, self._ram[key])
        n_staging = STAGING_SLOTS if plan.staging_bytes else 0
        self._staging = [self._take(arena) for _ in range(n_staging)]
        self._staged_copy = [None] * n_staging
        log.info("expert store (%s): %d of %d experts in host RAM, %s with %d staging slots%s; %d read on "
                 "demand from %s", self.variant, len(self._ram), self.total_experts,
                 format_size(arena.nbytes), n_staging, " (pinned)" if arena.pinned_bytes else "",
                 self.total_experts - len(self._ram), next(iter(self._pieces.values()))[0].path.parent)

    def _take(self, arena: HostArena) -> torch.Tensor:
        """The next expert-sized flat buffer of `arena`, viewed as the slot dtype."""
        return arena.take(self.expert_bytes).view(self.slot_dtype)

    def _read(self, key: Key, flat: torch.Tensor) -> int:
        """Copy expert `key` from the checkpoint's mmap into `flat` (any device); bytes read."""
        read = 0
        for p in self._pieces[key]:
            src = self._files[p.path].view(p.name, p.row, raw=p.raw).reshape(-1)
            flat[p.start:p.end].copy_(src)  # precise: converts the checkpoint's dtype here
            read += src.numel() * src.element_size()
        return read

    # -- serving ----------------------------------------------------------------------------
    def in_ram(self, key: Key) -> bool:
        return key in self._ram

    def buffer(self, key: Key) -> torch.Tensor:
        """The arena view of an expert held in RAM."""
        if key not in self._ram:
            raise KeyError(f"expert {key} is not held in host RAM (it is read from disk on demand); "
                           "use weights() or copy_to()")
        return self._ram[key]

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) on the host, for CPU execution. An expert not in RAM is read into a staging
        slot: use the result before the ring comes round (STAGING_SLOTS reads later)."""
        flat = self._ram.get(key)
        if flat is None:
            flat = self._staging[self._stage(key)]
        return self.expand(flat, key)

    def copy_to(self, key: Key, dst: torch.Tensor, *, stream: Any = None, dst_buffer: Hashable = None) -> None:
        """Copy expert `key` into the flat `dst` (a device cache slot). From the arena when in RAM;
        else, without a copy engine, straight from the mmap into `dst`, or with one through a pinned
        staging slot. With an engine the copy is non-blocking on `stream`, a write of `dst_buffer`."""
        src = self._ram.get(key)
        engine = self.engine
        if engine is None:
            if src is not None:
                dst.copy_(src)
            else:
                self._read_on_demand(key, dst)
            return
        if stream not in self._copy_streams:
            self._copy_streams.append(stream)
        if src is not None:
            engine.run(stream, lambda: dst.copy_(src, non_blocking=True), reads=[("expert in RAM", key)],
                       writes=[dst_buffer])
            return
        slot = self._stage(key)
        staged = self._staging[slot]
        engine.run(stream, lambda: dst.copy_(staged, non_blocking=True), reads=[("expert staging", slot)],
                   writes=[dst_buffer])
        self._staged_copy[slot] = engine.record(stream)  # the slot is not overwritten before this copy has read it

    def _stage(self, key: Key) -> int:
        """Read `key` into the next staging slot, once the copy out of it has completed; its index."""
        slot = self._next_staging
        self._next_staging = (slot + 1) % len(self._staging)
        pending = self._staged_copy[slot]
        if pending is not None:
            assert self.engine is not None  # only an engine's copies leave an event
            self.engine.host_wait(pending, "expert staging copied")
            self._staged_copy[slot] = None
        if self.engine is not None:
            self.engine.host_writes([("expert staging", slot)])
        self._read_on_demand(key, self._staging[slot])
        return slot

    def _read_on_demand(self, key: Key, flat: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self._counters["disk_read_bytes"] += self._read(key, flat)
        self._counters["disk_read_s"] += time.perf_counter() - t0
        self._counters["disk_reads"] += 1

    def expand(self, flat: torch.Tensor, key: Key | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) in the compute dtype from one flat expert `key` (arena view, staging slot or
        device slot), on its device; here plain views, a 4-bit store dequantizes, a GGUF store expands the
        blocks of `key`'s layer."""
        return split_expert(flat, self.layout)

    # -- accounting -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Host memory held (exact bytes: arena + staging; pinned only on CUDA), where experts live,
        and the on-demand reads from the checkpoint since load (or reset_stats); disk_read_bytes are
        the checkpoint's bytes (a bf16 checkpoint read into fp32 counts 2 bytes a weight)."""
        arena = self._arena
        return {
            "ram_budget_bytes": self.ram_budget_bytes,
            "host_ram_bytes": arena.nbytes if arena else 0,
            "host_pinned_bytes": arena.pinned_bytes if arena else 0,
            "host_pin": arena.pin_reason if arena else "no arena",
            "experts_in_ram": len(self._ram),
            "experts_from_disk": self.total_experts - len(self._ram) if self._pieces else 0,
            "staging_slots": len(self._staging),
            "disk_reads": self._counters["disk_reads"],
            "disk_read_bytes": self._counters["disk_read_bytes"],
            "disk_read_s": self._counters["disk_read_s"],
        }

    def reset_stats(self) -> None:
        self._counters.clear()

    def close(self) -> None:
        engine = self.engine
        if engine is not None:
            # Never unpin memory a copy still reads: the staged copies and those straight from the arena.
            for stream in self._copy_streams:
                engine.stream_sync(stream, "expert store close")
            engine.frees([("expert staging", slot) for slot in range(len(self._staging))]
                         + [("expert in RAM", key) for key in self._ram])
        self._copy_streams = []
        self._ram.clear()
        self._staging, self._staged_copy = [], []
        self._files.close()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
