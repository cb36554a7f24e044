"""Reads a dense model's decoder layers from a GGUF file as raw GGML blocks, one layer at a time.

Owns the GGUF side of layer streaming: the skeleton's Linears turned into block Linears (expanded on use),
per-layer entries and byte counts in ModelStore's terms, and the embedding / head / final norm placed on the
device (blocks for the first two: the lookup expands only its rows, the head a chunk of rows at a time).
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.contract.errors import ModelFolderError
from jobs.paging.block_weights import BLOCKS, BlockHead, ExpansionBuffer, embed_from_blocks, expand_on_use
from jobs.paging.gguf_file import GgufFile, GgufTensor

# The head expands at most this many elements at a time (in the shared buffer): 4 Mi elements is 8 MiB of
# fp16, a few hundred vocabulary rows of a 27B, and few enough chunks per pass for a small model.
HEAD_CHUNK_ELEMENTS = 1 << 22


class GgufStore:
    """ModelStore's reading interface over a GGUF file; bind() must run on the meta skeleton first."""

    def __init__(self, path: str | Path) -> None:
        self.file = GgufFile(path)
        self.model_dir = Path(path)  # named in messages, as a folder is
        self.config = self.file.config
        self.text_config = self.config.get_text_config()
        self.num_layers = self.text_config.num_hidden_layers
        self.variant = None  # a GGUF is already quantized: no fast variant
        self.bytes_read = 0
        self.layer_entries: list[dict[str, GgufTensor]] = []
        self.other_entries: dict[str, GgufTensor] = {}
        self.buffer: ExpansionBuffer | None = None
        self._lock = threading.Lock()  # the prefetch thread and the caller may both read

    # -- binding the skeleton ------------------------------------------------------------------
    def bind(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:   # a transformers causal LM
        """Map the file's tensors onto `model` (on meta), make its decoder Linears expand blocks on use,
        and place the embedding, final norm and head on `device`."""
        tensors = self.file.map_names(model)
        layers = model.get_decoder().layers
        prefix = next(n for n, m in model.named_modules() if m is layers) + "."
        per_layer: dict[int, dict[str, GgufTensor]] = {}
        for name, tensor in tensors.items():
            if name.startswith(prefix):
                index, _, rest = name[len(prefix):].partition(".")
                per_layer.setdefault(int(index), {})[rest] = tensor
            else:
                self.other_entries[name] = tensor
        if sorted(per_layer) != list(range(self.num_layers)):
            raise ModelFolderError(f"{self.model_dir.name} holds decoder layers {sorted(per_layer)[:8]}... but its "
                                   f"metadata declares {self.num_layers}")
        linears = [(i, rest) for i, entries in per_layer.items() for rest, t in entries.items()
                   if rest.endswith(".weight") and isinstance(layers[i].get_submodule(rest[:-7]), nn.Linear)]
        largest = max((math.prod(per_layer[i][rest].shape) for i, rest in linears), default=1)
        head = self._head_tensor(model)
        self.buffer = buffer = ExpansionBuffer(max(largest, min(math.prod(head.shape), HEAD_CHUNK_ELEMENTS)),
                                               dtype, device)
        for i, rest in linears:
            tensor = per_layer[i].pop(rest)
            expand_on_use(layers[i].get_submodule(rest[:-7]), tensor.ggml_type, buffer, tensor.gguf_name)
            per_layer[i][rest[:-7] + "." + BLOCKS] = tensor
        self.layer_entries = [per_layer[i] for i in range(self.num_layers)]
        self._place_non_layer(model, head, buffer, device, dtype)

    def _head_tensor(self, model: Any) -> GgufTensor:   # a transformers causal LM
        embed_name = _param_name(model, model.get_input_embeddings())
        if embed_name not in self.other_entries:
            raise ModelFolderError(f"{self.model_dir.name} has no token embedding for {embed_name}")
        head = model.get_output_embeddings()
        head_name = _param_name(model, head) if head is not None else None
        # transformers ties the head to the embedding when the file has no output.weight
        return self.other_entries.get(head_name or "", self.other_entries[embed_name])

    def _place_non_layer(self, model: Any, head_tensor: GgufTensor, buffer: ExpansionBuffer,
                         device: torch.device, dtype: torch.dtype) -> None:
        """`model`: a transformers causal LM; the head expands its chunks in `buffer`, the Linears' one."""
        embedding = model.get_input_embeddings()
        embed_name = _param_name(model, embedding)
        embed = self.other_entries.pop(embed_name)
        # On cpu the blocks stay views of the file: a lookup touches only its rows' pages.
        embed_blocks = self._raw_on(embed, device)
        embed_from_blocks(embedding, embed_blocks, embed.ggml_type, dtype, embed.gguf_name)
        head_module = model.get_output_embeddings()
        if head_module is not None:
            head_name = _param_name(model, head_module)
            self.other_entries.pop(head_name, None)
            blocks = embed_blocks if head_tensor is embed else self._raw_on(head_tensor, device)
            hidden = embedding.embedding_dim
            head = BlockHead(blocks, head_tensor.ggml_type, hidden, dtype, buffer, head_tensor.gguf_name)
            owner_name, _, attr = head_name.rpartition(".")[0].rpartition(".")
            setattr(model.get_submodule(owner_name) if owner_name else model, attr, head)
        for name, tensor in self.other_entries.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            value = self.file.values(tensor, dtype).to(device)
            self.bytes_read += tensor.nbytes
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        for module in model.modules():
            for attr, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[attr] = buf.to(device)  # rotary inv_freq, embed_scale, ...
        in_layers = {id(p) for p in model.get_decoder().layers.parameters()}
        missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in in_layers]
        if missing:
            raise ModelFolderError(f"{self.model_dir.name} lacks {', '.join(missing[:5])}")

    def _raw_on(self, tensor: GgufTensor, device: torch.device) -> torch.Tensor:
        self.bytes_read += tensor.nbytes
        raw = self.file.raw(tensor)
        if device.type == "cpu" and tensor.rows is None:
            return raw
        out = torch.empty(tensor.raw_shape, dtype=torch.uint8)
        self.file.copy_raw(tensor, out)
        return out.to(device)

    # -- ModelStore's reading interface ----------------------------------------------------------
    @property
    def layer_nbytes(self) -> list[int]:
        """Bytes each decoder layer occupies in the file (its blocks as stored)."""
        return [sum(t.nbytes for t in layer.values()) for layer in self.layer_entries]

    def layer_nbytes_as(self, dtype: torch.dtype) -> list[int]:
        """Bytes each layer takes on the host: blocks as stored, small float tensors in `dtype`."""
        return [sum(t.nbytes if name.endswith(BLOCKS) else math.prod(t.shape) * dtype.itemsize
                    for name, t in layer.items()) for layer in self.layer_entries]

    def open_variant(self, spec: object = None) -> None:
        raise ModelFolderError(f"{self.model_dir.name} is a GGUF file: its weights are already quantized blocks, "
                               "so it has no fast variant; use --variant precise")

    def read_layer(self, index: int, dtype: torch.dtype, *, pin: bool = False,
                   narrow_only: bool = False) -> dict[str, torch.Tensor]:
        """Layer `index`: Linear weights as raw blocks (rows in transformers' order), norms in `dtype`."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.layer_entries[index].items():
            if name.endswith(BLOCKS):
                value = torch.empty(tensor.raw_shape, dtype=torch.uint8)
                self.file.copy_raw(tensor, value)
            else:
                value = self.file.values(tensor, dtype)
            out[name] = value.pin_memory() if pin else value
        with self._lock:
            self.bytes_read += self.layer_nbytes[index]
        return out

    def read_layer_into(self, index: int, out: dict[str, torch.Tensor], *, fast: bool = False) -> None:
        """Copy layer `index` from the page cache into `out` (views of a slot or its staging buffer)."""
        for name, tensor in self.layer_entries[index].items():
            if name.endswith(BLOCKS):
                self.file.copy_raw(tensor, out[name])
            else:
                out[name].copy_(self.file.values(tensor, out[name].dtype))
        with self._lock:
            self.bytes_read += self.layer_nbytes[index]

    def tokenizer(self):
        return self.file.tokenizer()

    def close(self) -> None:
        self.file.close()


def _param_name(model: nn.Module, module: nn.Module) -> str:
    """The parameter name of `module`'s weight in `model`, e.g. model.embed_tokens.weight."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.weight"
    raise ModelFolderError("the model's embedding is not one of its modules")
