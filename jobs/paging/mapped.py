"""Zero-copy views of tensors in safetensors files, through one read-only mmap per file.

Owns parsing a safetensors header and handing out tensors that alias the page cache: an expert read on
demand is copied straight from the mapping into its destination, and no process-RAM copy is kept.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from pathlib import Path

import torch

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


class MappedFile:
    """One safetensors file mapped read-only (MAP_SHARED, PROT_READ: no commit charge, no copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        # name -> (dtype, shape, first byte, end byte) relative to the data section
        self.entries = {name: (_DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
                        for name, e in header.items()}

    def view(self, name: str, index: int | None = None, *, raw: bool = False) -> torch.Tensor:
        """The tensor `name` (or row `index` of its first axis) as a read-only view of the mapping; `raw`:
        its bytes, flat uint8. Never write to it: the pages belong to the file."""
        dtype, shape, begin, end = self.entries[name]
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{self.path.name}: {name} has {shape[0]} rows, asked for row {index}")
            row_bytes = (end - begin) // shape[0]
            begin, shape = begin + index * row_bytes, shape[1:]
        if raw:
            dtype, shape = torch.uint8, (math.prod(shape) * dtype.itemsize,)
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # a read-only mmap: torch warns that writes would fault
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=self._data_start + begin)
        return flat.view(shape)


class MappedFiles:
    """The mapped files of one checkpoint (or variant), opened on first use, unmapped on close."""

    def __init__(self) -> None:
        self._files: dict[Path, MappedFile] = {}

    def __getitem__(self, path: str | Path) -> MappedFile:
        path = Path(path)
        if path not in self._files:
            self._files[path] = MappedFile(path)
        return self._files[path]

    def close(self) -> None:
        # Dropped, not mmap.close()d: a view still alive (an expert's weights in use) keeps its pages valid.
        self._files.clear()
