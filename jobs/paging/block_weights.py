"""transformers' own modules computing from GGML blocks: a Linear's weight is expanded just before its
forward into one buffer every such Linear reuses; an embedding expands only the rows looked up; a head
expands its rows a chunk at a time. Owns those hooks and the one expansion buffer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from jobs.paging.ggml import expand, raw_shape

BLOCKS = "weight_blocks"  # the buffer that holds a Linear's raw blocks while its layer is materialized
KEEP_EXPANDED = "keep_expanded"   # set by keep_expanded(): expand at first use and keep the weight
EXPANDED = "expanded_weight"      # that kept weight


class ExpansionBuffer:
    """One flat buffer of the compute dtype on the device; each expanded weight is a view of its start, so
    at most one expanded weight exists at a time (forwards run one module after another)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.flat = torch.empty(numel, dtype=dtype, device=device)

    def view(self, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        return self.flat[offset:offset + math.prod(shape)].view(shape)

    def reserve(self, numel: int) -> None:
        """Hold at least `numel` elements (the hooks read `flat` at each call, so they see the new one)."""
        if self.flat.numel() < numel:
            self.flat = torch.empty(numel, dtype=self.flat.dtype, device=self.flat.device)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def expand_on_use(linear: nn.Linear, ggml_type: int, buffer: ExpansionBuffer, name: str) -> None:
    """Turn `linear` into one computing from raw blocks: its weight Parameter becomes the meta buffer
    BLOCKS (what the layer streamer fills and empties) and a pre-hook expands it into `buffer` per call."""
    meta = linear._parameters.pop("weight")
    # An nn.Linear always registers its weight (a meta Parameter here); only a linear already turned
    # into raw blocks lacks one, and it is never passed again.
    assert meta is not None, f"{name}: expand_on_use on a linear that has no weight Parameter"
    shape, dtype = tuple(meta.shape), meta.dtype
    linear.register_buffer(BLOCKS, torch.empty(raw_shape(ggml_type, shape, name), dtype=torch.uint8,
                                               device="meta"))
    idle = torch.empty(shape, dtype=dtype, device="meta")  # what other hooks may read (.dtype) between calls
    linear.weight = idle

    def pre(module: nn.Module, args: tuple) -> None:
        kept = module.__dict__.get(EXPANDED)
        if kept is not None:
            module.weight = kept
        elif module.__dict__.get(KEEP_EXPANDED):   # expanded once, at its first use, and kept
            module.weight = module.__dict__[EXPANDED] = expand(getattr(module, BLOCKS), ggml_type, shape, dtype,
                                                               tensor_name=name)
        else:
            module.weight = expand(getattr(module, BLOCKS), ggml_type, shape, dtype, out=buffer.view(shape),
                                   tensor_name=name)

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        module.weight = idle  # the buffer belongs to the next Linear now

    linear.register_forward_pre_hook(pre, prepend=True)
    linear.register_forward_hook(post)


def keep_expanded(layer: nn.Module) -> int:
    """A resident layer the plan has room to hold expanded: each of its block Linears expands once, at its
    first use, into a weight of its own and computes from it afterwards (no expansion per pass; the blocks
    stay too). Returns how many Linears it marked."""
    marked = 0
    for module in layer.modules():
        if BLOCKS in module._buffers:
            module.__dict__[KEEP_EXPANDED] = True
            marked += 1
    return marked


def embed_from_blocks(embedding: nn.Embedding, blocks: torch.Tensor, ggml_type: int, dtype: torch.dtype,
                      name: str) -> None:
    """`embedding` looks up rows of `blocks` (vocab, bytes per row): only the distinct ids of a call are
    expanded, and its forward runs on that small table with the ids renumbered."""
    hidden = embedding.embedding_dim
    embedding._parameters.pop("weight")
    idle = torch.empty((0, hidden), dtype=dtype, device=blocks.device)  # its dtype/device are read by hooks
    embedding.weight = idle
    embedding.register_buffer(BLOCKS, blocks)

    def pre(module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = getattr(module, BLOCKS).index_select(0, unique)
        module.weight = expand(rows, ggml_type, (unique.numel(), hidden), dtype, tensor_name=name)
        return (inverse.view(ids.shape), *args[1:])

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        module.weight = idle

    embedding.register_forward_pre_hook(pre, prepend=True)
    embedding.register_forward_hook(post)


class BlockHead(nn.Module):
    """A bias-free output projection over raw blocks (vocab, bytes per row), `chunk_rows` vocabulary rows
    expanded at a time into the shared buffer: a tied 27B head never exists at full precision."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, hidden: int, dtype: torch.dtype,
                 buffer: ExpansionBuffer, name: str) -> None:
        super().__init__()
        self.register_buffer(BLOCKS, blocks)
        self.ggml_type, self.hidden, self.name, self._buffer = ggml_type, hidden, name, buffer
        self.vocab = blocks.shape[0]
        self.chunk_rows = max(1, buffer.flat.numel() // hidden)
        self.weight = torch.empty((0, hidden), dtype=dtype, device=blocks.device)  # dtype for other hooks
        self.in_features, self.out_features = hidden, self.vocab

    def keep_expanded(self) -> None:
        """The plan has room for the whole head at the compute dtype: expand it once, at the next call."""
        self.__dict__[KEEP_EXPANDED] = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        blocks = getattr(self, BLOCKS)
        if self.__dict__.get(KEEP_EXPANDED):
            kept = self.__dict__.get(EXPANDED)
            if kept is None:
                kept = self.__dict__[EXPANDED] = expand(blocks, self.ggml_type, (self.vocab, self.hidden),
                                                        self.weight.dtype, tensor_name=self.name)
            return F.linear(hidden_states, kept)
        out = hidden_states.new_empty((*hidden_states.shape[:-1], self.vocab))
        for start in range(0, self.vocab, self.chunk_rows):
            rows = min(self.chunk_rows, self.vocab - start)
            weight = expand(blocks[start:start + rows], self.ggml_type, (rows, self.hidden), self.weight.dtype,
                            out=self._buffer.view((rows, self.hidden)), tensor_name=self.name)
            out[..., start:start + rows] = F.linear(hidden_states, weight)
        return out
