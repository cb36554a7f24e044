"""Host-side store of 4-bit (HQQ) MoE experts: one flat uint8 buffer per (layer, expert), in the
arena or read on demand from the variant's shards, under the same RAM budget as expert_store.py.

Owns laying out an expert's packed parts (codes, fp16 scale and zero of gate, up, down) in one buffer
read from the folder's quantized variant, and expanding a buffer or device slot to (gate_up, down).
"""
from __future__ import annotations

import re

import torch

from jobs.contract.errors import ModelFolderError
from jobs.paging.copy_engine import CopyEngine
from jobs.paging.moe.store import ExpertStore, Key, Piece
from jobs.paging.plan.moe_layout import PER_EXPERT_RE, PIECE_ORDER
from jobs.paging.quant import PARTS, Variant, dequantize_weight

# Variant keys of expert weights: per-expert gate/up/down (w1/w3/w2 in Mixtral; the checkpoint's own
# names), or fused slices `KEY.E`.
_FUSED_RE = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)\.(\d+)$")


def expert_pieces(variant: Variant, layers, num_experts: int) -> dict[tuple[int, int], list[str]]:
    """Per (layer, expert) the variant keys that make it, gate_up pieces first, down last."""
    found: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for key in variant.shapes:
        if m := PER_EXPERT_RE.match(key):
            layer, expert, name = int(m[1]), int(m[2]), m[3]
        elif m := _FUSED_RE.match(key):
            layer, expert, name = int(m[1]), int(m[3]), m[2]
        else:
            continue  # attention and the rest: the pager keeps them precise and resident
        found.setdefault((layer, expert), []).append((PIECE_ORDER[name], key))
    pieces = {}
    for layer in layers:
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

    def __init__(self, layout, variant: Variant, dtype: torch.dtype, *, pin_memory: bool = False,
                 engine: CopyEngine | None = None):
        super().__init__(layout, dtype, pin_memory=pin_memory, engine=engine)
        self.quant = variant
        self.spec = variant.spec
        self.variant = variant.spec.name
        self.bits = variant.spec.bits
        self._keys = expert_pieces(variant, self.layers, self.num_experts)
        first = self._keys[(self.layers[0], 0)]
        self._shapes = [variant.shapes[k] for k in first]
        self._n_gate_up = len(first) - 1
        self.expert_bytes = sum(variant.nbytes(k) for k in first)
        self.slot_dtype, self.slot_numel = torch.uint8, self.expert_bytes
        # (offset, nbytes, dtype, shape) of every part of every weight, from the first expert's headers
        self._layout: list[list[tuple[int, int, torch.dtype, torch.Size]]] = []

    def expand(self, flat: torch.Tensor, key: Key | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weights = []
        for shape, parts in zip(self._shapes, self._layout):
            packed = {name: flat[off:off + n].view(dt).view(sh)
                      for name, (off, n, dt, sh) in zip(PARTS, parts)}
            weights.append(dequantize_weight(packed, shape, self.spec, self.dtype))
        gate_up = weights[0] if self._n_gate_up == 1 else torch.cat(weights[:self._n_gate_up])
        return gate_up, weights[-1]

    def load(self, index=None, ram_budget_bytes: int | None = None) -> "QuantExpertStore":
        """Lay out every expert from the variant shards' headers, then fill the arena's experts (the
        original checkpoint's expert tensors are never read)."""
        self._pieces = self._find_pieces()
        self._fill(ram_budget_bytes)
        return self

    def _find_pieces(self, index=None) -> dict[Key, list[Piece]]:
        pieces: dict[Key, list[Piece]] = {}
        for (layer, expert), keys in self._keys.items():
            parts = [[(self.quant.file_of[key], part) for part in self.quant.part_keys(key)] for key in keys]
            found = [[self._files[path].entries[part][:2] for path, part in weight] for weight in parts]
            if not self._layout:
                self._layout = self._plan(found)
            pieces[(layer, expert)] = []
            for weight, shapes, layout in zip(parts, found, self._layout):
                for (path, part), (dt, sh), (off, n, want_dt, want_sh) in zip(weight, shapes, layout):
                    if dt != want_dt or tuple(sh) != tuple(want_sh):
                        raise ModelFolderError(f"variant {self.quant.path}: layer {layer} expert "
                                               f"{expert} has parts unlike expert 0's; quantize again")
                    pieces[(layer, expert)].append(Piece(path, part, None, off, off + n, raw=True))
        return pieces

    def _plan(self, parts: list[list[tuple[torch.dtype, tuple]]]):
        layout, offset = [], 0
        for tensors in parts:
            entry = []
            for dtype, shape in tensors:
                n = torch.Size(shape).numel() * dtype.itemsize
                # a part is viewed back as its dtype in place: its offset must be aligned to it
                assert offset % dtype.itemsize == 0, "misaligned quantized part"
                entry.append((offset, n, dtype, torch.Size(shape)))
                offset += n
            layout.append(entry)
        if offset != self.expert_bytes:
            raise ModelFolderError(f"variant {self.quant.path}: an expert's parts take {offset} bytes, "
                                   f"the manifest says {self.expert_bytes}; quantize again")
        return layout
