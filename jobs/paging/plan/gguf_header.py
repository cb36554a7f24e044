"""A GGUF file's header read with the standard library: metadata, the tensor table with each tensor's
block type, shape, data offset and exact byte size, split files gathered; no weight byte is ever read."""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.contract.errors import SettingError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
READ_CHUNK_BYTES = 1 << 20
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGML tensor types from the format's description: id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# metadata value types: id -> struct format (8: string, 9: array are read by hand)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# the least bytes a metadata pair and a tensor entry take: what must still follow in the header
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]         # as GGUF stores it: the fastest-varying dimension first
    offset_bytes: int              # from the start of the file that holds it
    nbytes: int                    # exact, from the type's block size and bytes per block
    file: Path

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0] if self.ggml_type in GGML_TYPES else f"type {self.ggml_type}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    files: tuple[Path, ...]        # one, or every part of a split file in order
    version: int
    metadata: dict[str, Any]       # the first part's key/value pairs (split.* keys included)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_offsets: tuple[int, ...] = ()   # where each file's tensor data starts
    header_bytes: int = 0          # bytes read from the files, all headers together

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """An architecture-prefixed key (`gemma3.block_count` for "block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...], name: str = "") -> int:
    """Exact stored bytes of a tensor: whole blocks along its first (contiguous) dimension."""
    if ggml_type not in GGML_TYPES:
        raise SettingError(f"tensor {name!r} has GGML type {ggml_type}, which this reader does not know; "
                           "use a file with standard block types (F16, Q8_0, Q4_K, ...)")
    type_name, block, block_bytes = GGML_TYPES[ggml_type]
    if shape and shape[0] % block:
        raise SettingError(f"tensor {name!r} ({type_name}) has a row of {shape[0]} elements, not a whole "
                           f"number of {block}-element blocks: the file is damaged")
    return math.prod(shape) // block * block_bytes


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.pread(fd, 4, 0) == MAGIC
    finally:
        os.close(fd)


def split_parts(path: Path) -> list[Path]:
    """Every part of a split GGUF (`NAME-00001-of-00003.gguf`) when `path` names one, else [path]."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise SettingError(f"split GGUF {path.name} is missing {', '.join(missing)} in {path.parent}; "
                           "download every part into the same folder")
    return parts


def read_header(path: str | Path) -> GGUFHeader:
    """The header of a GGUF file, or of every part of a split one (any part may be named)."""
    parts = split_parts(Path(path))
    tensors: dict[str, TensorInfo] = {}
    first: _Parsed | None = None
    offsets, read_bytes = [], 0
    for part in parts:
        parsed = _parse(part)
        first = first or parsed
        offsets.append(parsed.data_offset)
        read_bytes += parsed.read_bytes
        for t in parsed.tensors:
            if t.name in tensors:
                raise SettingError(f"tensor {t.name!r} appears twice in {path}: the split parts do not belong "
                                   "together")
            tensors[t.name] = t
    assert first is not None
    expected = first.metadata.get("split.tensors.count")
    if expected is not None and int(expected) != len(tensors):
        raise SettingError(f"{Path(path).name} announces {expected} tensors over its parts but they hold "
                           f"{len(tensors)}; download the parts again")
    return GGUFHeader(tuple(parts), first.version, first.metadata, tensors, tuple(offsets), read_bytes)


@dataclass
class _Parsed:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    read_bytes: int


class _Cursor:
    """Reads the header front to back with os.pread. A read never goes further than the bytes the header
    is known to still hold (`floor`), so nothing past the header's end, i.e. no weight byte, is read."""

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self.fd, self.path, self.size = fd, path, size
        self.buf, self.start, self.pos = b"", 0, 0
        self.floor = 0        # bytes that must follow the current item in the header (a lower bound)
        self.read_bytes = 0
        self.endian = "<"

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > self.start + len(self.buf):
            ahead = min(READ_CHUNK_BYTES, n + self.floor)
            want = max(n, ahead) - (self.start + len(self.buf) - self.pos)
            chunk = os.pread(self.fd, want, self.start + len(self.buf))
            self.read_bytes += len(chunk)
            keep = self.buf[self.pos - self.start:]
            self.buf, self.start = keep + chunk, self.pos
            if end > self.start + len(self.buf):
                raise SettingError(f"{self.path} ends inside its GGUF header: the file is truncated; "
                                   "download it again")
        out = self.buf[self.pos - self.start:end - self.start]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        fmt = self.endian + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in _SCALARS:   # one read for the whole array
                fmt = f"{self.endian}{count}{_SCALARS[item_type]}"
                return list(struct.unpack(fmt, self.take(struct.calcsize(fmt))))
            floor, items = self.floor, []
            for i in range(count):
                self.floor = floor + (count - i - 1) * 8   # each later string or array has its length
                items.append(self.value(item_type, key))
            self.floor = floor
            return items
        raise SettingError(f"{self.path}: metadata key {key!r} has value type {vtype}, unknown to GGUF "
                           "versions 2 and 3; the file is damaged or newer than this reader")


def _parse(path: Path) -> _Parsed:
    fd = os.open(path, os.O_RDONLY)
    try:
        cur = _Cursor(fd, path, os.fstat(fd).st_size)
        cur.floor = 4 + 8 + 8
        if cur.take(4) != MAGIC:
            raise SettingError(f"{path} is not a GGUF file (no GGUF magic); point at a .gguf file or a model "
                               "folder")
        raw = cur.take(4)
        version = struct.unpack("<I", raw)[0]
        if version > 0xFFFF:                  # written on a big-endian machine
            cur.endian, version = ">", struct.unpack(">I", raw)[0]
        if version not in (2, 3):
            raise SettingError(f"{path} is GGUF version {version}; versions 2 and 3 are read (convert it with a "
                               "current llama.cpp)")
        cur.floor = 8
        n_tensors = cur.unpack("Q")
        cur.floor = 0
        n_kv = cur.unpack("Q")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            cur.floor = (n_kv - i - 1) * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("I"), key)
        tensors = []
        for i in range(n_tensors):
            cur.floor = (n_tensors - i - 1) * _MIN_TENSOR_BYTES
            name = cur.string()
            shape = tuple(cur.unpack("Q") for _ in range(cur.unpack("I")))
            ggml_type, offset = cur.unpack("I"), cur.unpack("Q")
            tensors.append((name, ggml_type, shape, offset))
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_offset = -(-cur.pos // align) * align
        infos = [TensorInfo(name, t, shape, data_offset + off, tensor_nbytes(t, shape, name), path)
                 for name, t, shape, off in tensors]
        for info in infos:
            if info.offset_bytes + info.nbytes > cur.size:
                raise SettingError(f"{path} is {cur.size} bytes but tensor {info.name!r} ends at byte "
                                   f"{info.offset_bytes + info.nbytes}: the file is truncated; download it again")
        return _Parsed(version, metadata, infos, data_offset, cur.read_bytes)
    finally:
        os.close(fd)
