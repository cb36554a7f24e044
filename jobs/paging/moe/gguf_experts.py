"""A MoE GGUF file for the expert pager: each routed expert is its slice of raw GGML blocks of the fused
ffn_{gate,up,down}_exps tensors, held in the host store and copied to the device cache as stored, and expanded
to the compute dtype only where it runs, into the one buffer the model's block Linears reuse.

Owns that expert store (GgufExpertStore) and binding the rest of the file to the skeleton (bind_gguf_moe): every
non-expert Linear (attention, shared experts) resident as blocks and expanded on use, as the dense GGUF path does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from jobs.contract.errors import ModelFolderError
from jobs.paging.block_weights import ExpansionBuffer
from jobs.paging.copy_engine import CopyEngine
from jobs.paging.dense.gguf_store import GgufStore
from jobs.paging.dense.streamer import assign_tensors
from jobs.paging.ggml import expand
from jobs.paging.gguf_file import GgufFile, GgufTensor
from jobs.paging.moe.store import ExpertStore, Key, Piece
from jobs.paging.plan.moe_layout import SUPPORTED_SENTENCE, ExpertLayout

log = logging.getLogger(__name__)

# llama.cpp's fused expert tensors, in the order of the flat expert: gate rows, up rows (gate_up), then down
PROJECTIONS = ("gate", "up", "down")
PART_ALIGN = 4  # a part starts on a 4-byte boundary, so an F32 part can be viewed in place


@dataclass(frozen=True)
class ExpertPart:
    """One of an expert's three weights: where its blocks lie in the file and in the expert's flat buffer."""
    tensor: GgufTensor          # the fused [E, rows, cols] tensor of the layer
    start: int                  # first byte of this expert's blocks in its flat buffer
    nbytes: int                 # one expert's blocks of it: tensor.nbytes / E
    shape: tuple[int, int]      # one expert's weight, PyTorch order

    def raw(self, flat: torch.Tensor) -> torch.Tensor:
        """This part's blocks in `flat`, (rows, bytes per row)."""
        return flat[self.start:self.start + self.nbytes].view(self.tensor.raw_shape[1:])


class GgufExpertStore(ExpertStore):
    """ExpertStore's interface over a GGUF file: an expert's buffer (arena view, staging slot, device slot) is
    its blocks, laid out gate, up, down; `expand` writes (gate_up, down) into the shared expansion buffer.

    A file may store a projection in another block type from one layer to the next (Q4_K_M: ffn_down in Q6_K on
    some layers, Q4_K on others): a slot then takes the largest layer's expert, `layer_expert_bytes` are exact."""

    def __init__(self, layout: ExpertLayout, file: GgufFile, dtype: torch.dtype, *, pin_memory: bool = False,
                 engine: CopyEngine | None = None) -> None:
        super().__init__(layout, dtype, pin_memory=pin_memory, engine=engine)
        self.file = file
        self.variant = "gguf blocks"
        self._parts = {layer: self._layer_parts(layer) for layer in self.layers}
        self.layer_expert_bytes = {layer: sum(p.nbytes for p in parts) for layer, parts in self._parts.items()}
        self.expert_bytes = max(max(p.start + p.nbytes for p in parts) for parts in self._parts.values())
        self.slot_dtype, self.slot_numel = torch.uint8, self.expert_bytes
        self.bits = round(8 * self.expert_bytes / layout.expert_numel, 3)   # per weight, as stored
        self._buffers: dict[torch.device, ExpansionBuffer] = {}  # one expert expanded at a time, per device

    def share_buffer(self, buffer: ExpansionBuffer) -> None:
        """Expand on buffer's device into `buffer` (the one the model's block Linears reuse), grown to an expert."""
        buffer.reserve(self.layout.expert_numel)
        self._buffers[buffer.flat.device] = buffer

    def _layer_parts(self, layer: int) -> list[ExpertPart]:
        hidden, inter, n = self.layout.hidden, self.layout.intermediate, self.num_experts
        parts, offset = [], 0
        for proj in PROJECTIONS:
            tensor = self.file.tensor(f"blk.{layer}.ffn_{proj}_exps.weight")
            shape = (hidden, inter) if proj == "down" else (inter, hidden)
            if tensor.shape != (n, *shape):
                raise ModelFolderError(
                    f"{self.file.path.name}: {tensor.gguf_name} has shape {list(tensor.shape)} but the model "
                    f"transformers builds from its metadata wants {[n, *shape]} (moe_intermediate_size "
                    f"{inter}); the file's metadata and tensors do not agree")
            offset = -(-offset // PART_ALIGN) * PART_ALIGN
            parts.append(ExpertPart(tensor, offset, tensor.nbytes // n, shape))
            offset += tensor.nbytes // n
        return parts

    # -- loading ------------------------------------------------------------------------------
    def load(self, index: Any = None, ram_budget_bytes: int | None = None) -> "GgufExpertStore":
        """Every expert's slices (from the tensor table), then the arena's experts read from the mmap."""
        self._pieces = {(layer, e): [Piece(self.file.path, p.tensor.gguf_name, e, p.start, p.start + p.nbytes,
                                           raw=True) for p in parts]
                        for layer, parts in self._parts.items() for e in range(self.num_experts)}
        self._fill(ram_budget_bytes)
        return self

    def _read(self, key: Key, flat: torch.Tensor) -> int:
        """Copy expert `key`'s blocks from the file's mapping into `flat`; bytes read."""
        layer, expert = key
        for part in self._parts[layer]:
            part.raw(flat).copy_(self.file.raw(part.tensor)[expert])
        return self.layer_expert_bytes[layer]

    # -- serving ------------------------------------------------------------------------------
    def expand(self, flat: torch.Tensor, key: Key | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of expert `key` expanded from `flat` into the expansion buffer of
        flat's device: valid until the next expansion there (the pager uses one expert at a time)."""
        if key is None:
            raise ValueError("a GGUF expert's blocks differ by layer: expand needs its (layer, expert) key")
        buffer = self._buffers.get(flat.device)
        if buffer is None:  # CPU execution of a miss on a CUDA run: a host buffer of its own
            buffer = self._buffers[flat.device] = ExpansionBuffer(self.layout.expert_numel, self.dtype, flat.device)
        gate, up, down = self._parts[key[0]]
        inter, hidden = gate.shape
        gate_up = buffer.view((2 * inter, hidden))
        for part, out in ((gate, gate_up[:inter]), (up, gate_up[inter:])):
            expand(part.raw(flat), part.tensor.ggml_type, part.shape, self.dtype, out=out,
                   tensor_name=part.tensor.gguf_name)
        down_w = expand(down.raw(flat), down.tensor.ggml_type, down.shape, self.dtype,
                        out=buffer.view(down.shape, offset=gate_up.numel()), tensor_name=down.tensor.gguf_name)
        return gate_up, down_w

    def close(self) -> None:
        super().close()
        self._buffers.clear()
        self.file.close()


def bind_gguf_moe(model: Any, experts: dict[int, Any], store: GgufStore, expert_store: GgufExpertStore,
                  device: torch.device, dtype: torch.dtype) -> None:
    """Fill the meta-built `model` (a transformers MoE causal LM) from the GGUF `store`, experts excluded: its
    Linears keep their blocks resident on `device` and expand on use into store.buffer, which `expert_store`
    shares; the embedding and head as the dense path places them, norms and routers in `dtype`. The experts
    modules become placeholders until the pager installs its own."""
    for idx in experts:
        model.model.layers[idx].mlp.experts = nn.Module()  # no parameters: transformers' map skips *_exps
    store.bind(model, device, dtype)
    assert store.buffer is not None  # bind made it
    expert_store.share_buffer(store.buffer)
    layers = model.get_decoder().layers
    for i in range(store.num_layers):
        tensors = store.read_layer(i, dtype)
        slots = {}
        for name in tensors:
            owner, _, attr = name.rpartition(".")
            slots[name] = (layers[i].get_submodule(owner), attr, None)
        assign_tensors(slots, {name: t.to(device) for name, t in tensors.items()})
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelFolderError(f"{store.model_dir.name} lacks {', '.join(leftover[:5])}")
    model.config.dtype = dtype


def check_gguf_moe(file: GgufFile, num_experts_in_config: int) -> None:
    """Refuse a MoE GGUF that transformers' GGUF loader reads without its experts (Mixtral's files say
    `llama`, DeepSeek's `deepseek2`): its result could not be checked against transformers' own load."""
    experts = file.header.arch_key("expert_count")
    if experts and not num_experts_in_config:
        raise ModelFolderError(
            f"{file.path.name} is a {file.architecture} GGUF with {experts} routed experts per layer, which "
            f"transformers' GGUF loader reads as a dense {file.config.model_type} model without experts; the "
            "expert pager reads MoE GGUFs of the architectures transformers loads with their experts (qwen2moe, "
            f"qwen3moe): use this model's safetensors folder instead. {SUPPORTED_SENTENCE}")

