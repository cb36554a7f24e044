"""Expands llama.cpp's GGML weight blocks (Q4_0 ... Q8_0, Q2_K ... Q6_K, F32/F16/BF16) to floats in torch.

Owns the block layouts (from the GGUF format's description) and `expand`, which runs wherever the raw uint8
blocks are (CPU or CUDA) and writes the compute dtype, optionally into a caller's reused buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from jobs.contract.errors import ModelFolderError

QK_K = 256  # elements in one k-quant super-block

# Elements expanded per step: bounds the float32 temporaries of one expansion (a few x 16 MiB) whatever
# the weight's size.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BlockType:
    name: str
    block_size: int      # elements per block
    type_size: int       # bytes per block
    expand_blocks: Callable[[torch.Tensor], torch.Tensor]  # (n, type_size) uint8 -> (n, block_size) float32


def _f16(field: torch.Tensor) -> torch.Tensor:
    """A little-endian fp16 scale field, (n, 2) bytes -> (n, 1) float32."""
    return field.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split bytes into low then high 4-bit halves per group: (n, groups*L) -> (n, groups, 2, L)."""
    q = qs.reshape(qs.shape[0], groups, 1, -1)
    return torch.cat((q & 0x0F, q >> 4), dim=2)


def _bits(field: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """`count` fields of `width` bits from each byte, lowest first: (n, ..., L) -> (n, ..., count, L)."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8, device=field.device)
    return (field.unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << width) - 1)


def _low_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """A little-endian uint32 of 32 high bits -> (n, 32) values 0/1, bit j for element j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


# -- legacy 32-element blocks: a fp16 scale d (and a fp16 minimum m for the _1 kinds), 4 or 5 bit
#    values whose low nibbles hold elements 0-15 and high nibbles 16-31, high bits of 5-bit ones in qh.
def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18], 1).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20], 1).reshape(b.shape[0], 32).float()
    return d * q + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    low = _nibbles(b[:, 6:22], 1).reshape(b.shape[0], 32)
    q = (low | (_low_bits_32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    low = _nibbles(b[:, 8:24], 1).reshape(b.shape[0], 32)
    q = (low | (_low_bits_32(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    return b[:, 2:34].contiguous().view(torch.int8).float() * d


# -- k-quants: 256-element super-blocks of 16 (or 8) sub-blocks, each with its own quantized scale.
def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    # two halves of 32 bytes; each byte holds four 2-bit values, for 4 consecutive runs of 32 elements
    q = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 6-bit scales: low 4 bits from the nibbles of bytes 0-7, high 2 bits from the pairs of bytes 8-11
    low = _bits(packed[:, 0:8], 4, 2).reshape(n, 16)
    high = _bits(packed[:, 8:12], 2, 4).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    # a cleared high bit means "subtract 4"
    qh = (_bits(hmask.reshape(n, 1, 32), 1, 8).reshape(n, 16, 16)) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 6-bit scales and eight 6-bit minimums from the 12 bytes Q4_K and Q5_K share: bytes 0-3 and
    4-7 hold scales/mins 0-3 in their low 6 bits, bytes 8-11 the low 4 bits of 4-7 whose high 2 bits ride
    on top of bytes 0-7."""
    n = packed.shape[0]
    p = packed.reshape(n, 3, 4)
    lo, mid, hi = p[:, 0], p[:, 1], p[:, 2]
    sc = torch.cat((lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)), dim=-1)
    mn = torch.cat((mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_sub_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: each of the 8 sub-blocks' scale and minimum, (n, 8, 1) float32, from d, dmin and the
    packed 6-bit fields."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k_sub_scales(b)
    q = _nibbles(b[:, 16:144], 4).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k_sub_scales(b)
    low = _nibbles(b[:, 48:176], 4).reshape(n, 8, 32)
    high = _bits(b[:, 16:48].reshape(n, 1, 32), 1, 8).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    dl = (d * sc).reshape(n, 16, 1)
    low = _nibbles(ql, 2).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


# -- unquantized storage
def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# GGML type ids as the GGUF header numbers them.
BLOCK_TYPES: dict[int, BlockType] = {
    0: BlockType("F32", 1, 4, _f32),
    1: BlockType("F16", 1, 2, _f16_values),
    2: BlockType("Q4_0", 32, 18, _q4_0),
    3: BlockType("Q4_1", 32, 20, _q4_1),
    6: BlockType("Q5_0", 32, 22, _q5_0),
    7: BlockType("Q5_1", 32, 24, _q5_1),
    8: BlockType("Q8_0", 32, 34, _q8_0),
    10: BlockType("Q2_K", QK_K, 84, _q2_k),
    11: BlockType("Q3_K", QK_K, 110, _q3_k),
    12: BlockType("Q4_K", QK_K, 144, _q4_k),
    13: BlockType("Q5_K", QK_K, 176, _q5_k),
    14: BlockType("Q6_K", QK_K, 210, _q6_k),
    30: BlockType("BF16", 1, 2, _bf16),
}
FLOAT_TYPES = frozenset((0, 1, 30))


def type_name(ggml_type: int) -> str:
    if ggml_type in BLOCK_TYPES:
        return BLOCK_TYPES[ggml_type].name
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def block_type(ggml_type: int, tensor_name: str) -> BlockType:
    """The layout of `ggml_type`; any other type is refused, naming it and the tensor."""
    try:
        return BLOCK_TYPES[int(ggml_type)]
    except KeyError:
        raise ModelFolderError(
            f"tensor {tensor_name} is stored as {type_name(int(ggml_type))}, which the streamer cannot expand "
            f"(supported: {', '.join(t.name for t in BLOCK_TYPES.values())}); use a GGUF quantized with one of "
            "those, e.g. Q4_K_M or Q4_0") from None


def raw_shape(ggml_type: int, shape: Sequence[int], tensor_name: str = "tensor") -> tuple[int, ...]:
    """The raw uint8 shape of a weight of (PyTorch-order) `shape`: its rows, then the bytes of one row."""
    kind = block_type(ggml_type, tensor_name)
    *rows, width = shape
    if width % kind.block_size:
        raise ModelFolderError(f"tensor {tensor_name}: rows of {width} elements are not whole {kind.name} blocks "
                               f"of {kind.block_size}; the file is damaged")
    return (*rows, width // kind.block_size * kind.type_size)


def expand(raw: torch.Tensor, ggml_type: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
           out: torch.Tensor | None = None, *, tensor_name: str = "tensor") -> torch.Tensor:
    """The weight of `shape` (PyTorch order: rows, then elements of a row) held in the uint8 blocks `raw`,
    in `dtype`, on raw's device. With `out` (a buffer of `shape` and `dtype` the caller reuses) the values
    are written there and no tensor of the weight's size is allocated: the float32 temporaries cover
    CHUNK_ELEMENTS at a time. Values are computed in float32, exactly as the format defines them, then
    rounded once to `dtype`. `raw` may be a slice of rows (e.g. one expert's or a chunk of an lm_head)."""
    kind = block_type(ggml_type, tensor_name)
    numel = math.prod(shape)
    if raw.dtype != torch.uint8 or raw.numel() * kind.block_size != numel * kind.type_size:
        raise ValueError(f"{tensor_name}: {raw.numel()} bytes of {raw.dtype} do not hold {tuple(shape)} as "
                         f"{kind.name}")
    blocks = raw.reshape(-1, kind.type_size)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=raw.device)
    elif out.shape != torch.Size(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{tensor_name}: out must be a contiguous {dtype} tensor of shape {tuple(shape)}")
    flat = out.view(-1, kind.block_size)
    step = max(1, CHUNK_ELEMENTS // kind.block_size)
    for start in range(0, blocks.shape[0], step):
        flat[start:start + step] = kind.expand_blocks(blocks[start:start + step])
    return out
