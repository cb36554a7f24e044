"""Host-side store of 4-bit (HQQ) Mixtral experts: one flat uint8 buffer per (layer, expert).

Owns laying out an expert's packed parts (codes, fp16 scale and zero of w1, w3, w2) in one buffer
read from the folder's quantized variant, and expanding a buffer or device slot to (gate_up, down).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from jobs.errors import ModelFolderError
from jobs.paging.expert_store import PER_EXPERT_RE, ExpertStore
from jobs.paging.quant import PARTS, Variant, dequantize_weight
from jobs.units import format_size

log = logging.getLogger(__name__)

# Variant keys of expert weights: released per-expert w1/w3/w2 (the checkpoint's own names), or
# fused slices `KEY.E`.
_FUSED_RE = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)\.(\d+)$")
# gate_up is w1 rows then w3 rows (what the pager's SwiGLU chunks), then down.
_PIECE_ORDER = {"w1": 0, "w3": 1, "gate_up_proj": 0, "w2": 2, "down_proj": 2}


def expert_pieces(variant: Variant, num_layers: int, num_experts: int) -> dict[tuple[int, int], list[str]]:
    """Per (layer, expert) the variant keys that make it, gate_up pieces first, down last."""
    found: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for key in variant.shapes:
        if m := PER_EXPERT_RE.match(key):
            layer, expert, name = int(m[1]), int(m[2]), m[3]
        elif m := _FUSED_RE.match(key):
            layer, expert, name = int(m[1]), int(m[3]), m[2]
        else:
            continue  # attention and the rest: the pager keeps them precise and resident
        found.setdefault((layer, expert), []).append((_PIECE_ORDER[name], key))
    pieces = {}
    for layer in range(num_layers):
        for expert in range(num_experts):
            got = sorted(found.get((layer, expert), []))
            if [o for o, _ in got] not in ([0, 1, 2], [0, 2]):
                raise ModelFolderError(
                    f"the {variant.spec.name} variant at {variant.path} has no complete quantized "
                    f"weights for layer {layer} expert {expert} (the group size must divide the hidden "
                    "and intermediate sizes); write it again with a smaller --group-size "
                    "(python -m jobs.paging.quant --model DIR --group-size 32 --force)")
            pieces[(layer, expert)] = [k for _, k in got]
    return pieces


class QuantExpertStore(ExpertStore):
    """Same interface as ExpertStore; buffers are the 4-bit bytes, `expand` dequantizes them on
    whatever device they sit (host for CPU execution of a miss, the GPU for a cache slot)."""

    def __init__(self, config, variant: Variant, dtype: torch.dtype, *, pin_memory: bool = False):
        super().__init__(config, dtype, pin_memory=pin_memory)
        self.quant = variant
        self.spec = variant.spec
        self.variant = variant.spec.name
        self.bits = variant.spec.bits
        self._pieces = expert_pieces(variant, self.num_layers, self.num_experts)
        first = self._pieces[(0, 0)]
        self._shapes = [variant.shapes[k] for k in first]
        self._n_gate_up = len(first) - 1
        self.expert_bytes = sum(variant.nbytes(k) for k in first)
        # (offset, nbytes, dtype, shape) of every part, filled from the first expert read
        self._layout: list[list[tuple[int, int, torch.dtype, torch.Size]]] = []

    def expand(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = []
        for shape, parts in zip(self._shapes, self._layout):
            packed = {name: flat[off:off + n].view(dt).view(sh)
                      for name, (off, n, dt, sh) in zip(PARTS, parts)}
            weights.append(dequantize_weight(packed, shape, self.spec, self.dtype))
        gate_up = weights[0] if self._n_gate_up == 1 else torch.cat(weights[:self._n_gate_up])
        return gate_up, weights[-1]

    def load(self, index=None, ram_budget_bytes: int | None = None) -> "QuantExpertStore":
        """Fill every expert buffer from the variant shards, part by part (the original
        checkpoint's expert tensors are never read)."""
        self.check_budget(ram_budget_bytes)
        handles: dict[Path, object] = {}

        def read(key: str) -> torch.Tensor:
            path = self.quant.file_of[key.rsplit(".", 1)[0]]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            return handles[path].get_tensor(key)

        for (layer, expert), keys in self._pieces.items():
            parts = [[read(k) for k in self.quant.part_keys(key)] for key in keys]
            if not self._layout:
                self._layout = self._plan(parts)
            flat = torch.empty(self.expert_bytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            for tensors, layout in zip(parts, self._layout):
                for tensor, (off, n, dt, sh) in zip(tensors, layout):
                    if tensor.dtype != dt or tensor.shape != sh:
                        raise ModelFolderError(f"variant {self.quant.path}: layer {layer} expert "
                                               f"{expert} has parts unlike expert 0's; quantize again")
                    flat[off:off + n].copy_(tensor.contiguous().view(-1).view(torch.uint8))
            self._buffers[(layer, expert)] = flat
        handles.clear()
        log.info("expert store (%s): %d experts, %s in host RAM%s", self.variant, len(self._buffers),
                 format_size(self.total_bytes), " (pinned)" if self.pin_memory else "")
        return self

    def _plan(self, parts: list[list[torch.Tensor]]):
        layout, offset = [], 0
        for tensors in parts:
            entry = []
            for t in tensors:
                n = t.numel() * t.element_size()
                # a part is viewed back as its dtype in place: its offset must be aligned to it
                assert offset % t.element_size() == 0, "misaligned quantized part"
                entry.append((offset, n, t.dtype, t.shape))
                offset += n
            layout.append(entry)
        if offset != self.expert_bytes:
            raise ModelFolderError(f"variant {self.quant.path}: an expert's parts take {offset} bytes, "
                                   f"the manifest says {self.expert_bytes}; quantize again")
        return layout
