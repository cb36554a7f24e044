"""Host-side Mixtral expert store: one contiguous read-only buffer per (layer, expert).

Owns reading a Mixtral safetensors folder tensor by tensor, in either expert layout.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from jobs.errors import BudgetError
from jobs.units import format_size

log = logging.getLogger(__name__)

# Released checkpoints (and transformers 5's save_pretrained, which reverts its own fusion)
# store w1 (gate), w3 (up), w2 (down) per expert; transformers 5 in memory fuses them.
PER_EXPERT_RE = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED_RE = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")


def is_expert_key(name: str) -> bool:
    return bool(PER_EXPERT_RE.match(name) or _FUSED_RE.match(name))


class CheckpointIndex:
    """Which safetensors file holds each tensor; reads headers only, never whole shards."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
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


def expert_numel(config) -> int:
    """Elements of one expert: gate_up [2I, H] followed by down [H, I]."""
    return 3 * config.intermediate_size * config.hidden_size


def expert_nbytes(config, dtype: torch.dtype) -> int:
    return expert_numel(config) * dtype.itemsize


def split_expert(flat: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (gate_up [2I, H], down [H, I]) into one flat expert buffer or device slot."""
    hidden, inter = config.hidden_size, config.intermediate_size
    n_gate_up = 2 * inter * hidden
    return flat[:n_gate_up].view(2 * inter, hidden), flat[n_gate_up:].view(hidden, inter)


class ExpertStore:
    """All experts of all layers in host RAM, pinned when the device is CUDA; never written back."""

    def __init__(self, config, dtype: torch.dtype, *, pin_memory: bool = False):
        self.config = config
        self.dtype = dtype
        self.num_layers = config.num_hidden_layers
        self.num_experts = config.num_local_experts
        self.expert_bytes = expert_nbytes(config, dtype)
        self.variant = "precise"  # what the stats call the expert format; see expert_quant.py
        self.bits = dtype.itemsize * 8
        self.pin_memory = pin_memory
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    def check_budget(self, ram_budget_bytes: int | None) -> None:
        if ram_budget_bytes is not None and self.total_bytes > ram_budget_bytes:
            raise BudgetError(
                f"the expert store needs {self.total_bytes} bytes ({format_size(self.total_bytes)}) "
                f"of host RAM for {self.num_layers} layers x {self.num_experts} experts x "
                f"{self.expert_bytes} bytes, but ram_budget_bytes is {ram_budget_bytes} "
                f"({format_size(ram_budget_bytes)}); raise ram_budget_bytes or load in a "
                "smaller dtype (bf16/fp16)")

    def buffer(self, key: tuple[int, int]) -> torch.Tensor:
        return self._buffers[key]

    def weights(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.expand(self._buffers[key])

    def expand(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) in the compute dtype from one flat expert buffer or device slot, on its
        device; here plain views, a 4-bit store dequantizes."""
        return split_expert(flat, self.config)

    def load(self, index: CheckpointIndex, ram_budget_bytes: int | None = None) -> "ExpertStore":
        """Fill every expert buffer from the checkpoint, one tensor (or fused row) at a time."""
        self.check_budget(ram_budget_bytes)
        per_expert, fused = {}, {}
        for name in index.keys():
            if m := PER_EXPERT_RE.match(name):
                per_expert[(int(m[1]), int(m[2]), m[3])] = name
            elif m := _FUSED_RE.match(name):
                fused[(int(m[1]), m[2])] = name
        inter = self.config.intermediate_size
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                flat = torch.empty(expert_numel(self.config), dtype=self.dtype,
                                   pin_memory=self.pin_memory)
                gate_up, down = split_expert(flat, self.config)
                if (layer, "gate_up_proj") in fused and (layer, "down_proj") in fused:
                    gate_up.copy_(index.read(fused[(layer, "gate_up_proj")], expert))
                    down.copy_(index.read(fused[(layer, "down_proj")], expert))
                else:
                    names = [per_expert.get((layer, expert, w)) for w in ("w1", "w3", "w2")]
                    if None in names:
                        raise KeyError(
                            f"checkpoint {index.model_dir} has no weights for layer {layer} "
                            f"expert {expert} (neither experts.{expert}.w1/w2/w3 nor fused "
                            "experts.gate_up_proj/down_proj)")
                    gate_up[:inter].copy_(index.read(names[0]))
                    gate_up[inter:].copy_(index.read(names[1]))
                    down.copy_(index.read(names[2]))
                self._buffers[(layer, expert)] = flat
        log.info("expert store: %d experts, %s in host RAM%s", len(self._buffers),
                 format_size(self.total_bytes), " (pinned)" if self.pin_memory else "")
        return self

    def close(self) -> None:
        self._buffers.clear()
