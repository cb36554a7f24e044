"""One GGUF model as the engine reads it: config and tokenizer through transformers, the tensor table from the
header (every part of a split file gathered), raw block bytes as zero-copy views of one read-only mmap per part,
and transformers' names for its tensors.

Owns what transformers' own GGUF load does to a tensor besides dequantizing (llama's q/k row order, Gemma's
norms stored +1), found by running transformers' own tensor processor, so a streamed weight equals its load.
"""
from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.contract.errors import ModelFolderError
from jobs.paging.ggml import FLOAT_TYPES, block_type, expand, raw_shape
from jobs.paging.plan.gguf_header import read_header


@dataclass(frozen=True)
class GgufTensor:
    gguf_name: str           # name in the file, e.g. blk.3.attn_q.weight
    ggml_type: int
    shape: tuple[int, ...]   # PyTorch order (rows first)
    offset: int              # first byte in the file (the part) that holds it
    nbytes: int
    rows: torch.Tensor | None = None  # transformers' row order as indices into the stored rows; None: as stored
    part: int = 0            # which part of a split file holds it (0: the first, or the only file)

    @property
    def raw_shape(self) -> tuple[int, ...]:
        return raw_shape(self.ggml_type, self.shape, self.gguf_name)

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in FLOAT_TYPES


class GgufFile:
    """The header, the tensor table under transformers' parameter names, and raw views of the data."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFolderError(f"GGUF file {self.path} does not exist")
        # The headers alone, no weight byte read; a split file (NAME-00001-of-0000N.gguf, any part named) has
        # every part gathered, and its first part holds the metadata transformers reads config and tokenizer from.
        self.header = header = read_header(self.path)
        self._first = header.files[0]
        try:
            self.config = AutoConfig.from_pretrained(self._first.parent, gguf_file=self._first.name)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise ModelFolderError(f"transformers cannot read {self._first.name} as a model: {exc}") from None
        self.architecture = header.architecture
        index = {part: i for i, part in enumerate(header.files)}
        self.tensors = {name: (info.ggml_type, tuple(reversed(info.shape)), info.offset_bytes, info.nbytes,
                               index[info.file])
                        for name, info in header.tensors.items()}
        self._mms: list[mmap.mmap] = []
        for part in header.files:
            with open(part, "rb") as f:
                self._mms.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def tensor(self, gguf_name: str) -> GgufTensor:
        """The file's tensor `gguf_name` as stored (rows in the file's order), its block type checked."""
        if gguf_name not in self.tensors:
            raise ModelFolderError(f"{self.path.name} has no tensor {gguf_name}; the file is incomplete or not the "
                                   f"{self.architecture} layout its metadata declares")
        ggml_type, shape, offset, nbytes, part = self.tensors[gguf_name]
        block_type(ggml_type, gguf_name)  # refuses IQ*, TQ*, MXFP4, ... naming the tensor
        return GgufTensor(gguf_name, ggml_type, shape, offset, nbytes, part=part)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._first.parent, gguf_file=self._first.name)

    def _processor(self) -> Any:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        # transformers hands its processors the config it parsed from the same header
        return TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.config.to_dict())

    def map_names(self, model: torch.nn.Module) -> dict[str, GgufTensor]:
        """transformers' parameter name -> the file's tensor, for every tensor transformers' loader would
        assign to `model` (built from self.config); every weight type is checked here, before any is read."""
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        processor = self._processor()
        names = get_gguf_hf_weights_map(model, processor)
        out: dict[str, GgufTensor] = {}
        for gguf_name, (ggml_type, shape, offset, nbytes, part) in self.tensors.items():
            if gguf_name not in names:
                continue  # transformers' own load skips it too (e.g. rope_freqs)
            block_type(ggml_type, gguf_name)  # refuses IQ*, TQ*, MXFP4, ... naming the tensor
            rows = self._row_order(processor, gguf_name, shape) if len(shape) >= 2 else None
            out[names[gguf_name]] = GgufTensor(gguf_name, ggml_type, shape, offset, nbytes, rows, part)
        return out

    def _row_order(self, processor: Any, gguf_name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Run transformers' processor on the row numbers: a 2-D weight it only reorders (llama's q/k
        permutation) is read in that order; one it changes otherwise cannot be streamed as blocks."""
        probe = np.arange(shape[0], dtype=np.float32).reshape(shape[0], 1)
        result = processor.process(weights=probe, name=gguf_name, tensor_key_mapping={}, parsed_parameters={})
        order = np.asarray(result.weights).reshape(-1)
        if result.name != gguf_name or order.shape != (shape[0],) or not np.array_equal(np.sort(order), probe[:, 0]):
            raise ModelFolderError(f"transformers transforms {gguf_name} of this {self.architecture} GGUF beyond a "
                                   "row order, which the streamer cannot apply to blocks; convert the file to a "
                                   "safetensors folder instead")
        if np.array_equal(order, probe[:, 0]):
            return None
        return torch.from_numpy(order.astype(np.int64))

    def raw(self, tensor: GgufTensor) -> torch.Tensor:
        """The stored bytes of `tensor`, (rows, bytes per row) uint8, as a read-only view of the mapping."""
        with warnings.catch_warnings():  # a read-only mmap: torch warns that writes would fault
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self._mms[tensor.part], dtype=torch.uint8, count=tensor.nbytes,
                                    offset=tensor.offset)
        return flat.view(tensor.raw_shape)

    def copy_raw(self, tensor: GgufTensor, out: torch.Tensor) -> None:
        """Copy `tensor`'s blocks, rows in transformers' order, into `out` (its raw shape, uint8)."""
        source = self.raw(tensor)
        if tensor.rows is None:
            out.copy_(source)
        else:
            torch.index_select(source, 0, tensor.rows, out=out)

    def values(self, tensor: GgufTensor, dtype: torch.dtype) -> torch.Tensor:
        """A small float tensor (a norm, a bias) exactly as transformers' own load makes it: expanded to
        float32, through the architecture's processor (e.g. Gemma's norm - 1), then `dtype`."""
        weights = expand(self.raw(tensor), tensor.ggml_type, tensor.shape, tensor_name=tensor.gguf_name).numpy()
        result = self._processor().process(weights=weights, name=tensor.gguf_name, tensor_key_mapping={},
                                           parsed_parameters={})
        return torch.from_numpy(np.array(result.weights, dtype=np.float32)).to(dtype)

    def close(self) -> None:
        # Dropped, not closed: a view still alive keeps its pages valid.
        self._mms = []
