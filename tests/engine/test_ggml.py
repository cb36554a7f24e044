"""GGML block expansion (jobs.paging.ggml) against gguf-py's own dequantize, bit for bit, on the CPU.

Blocks come from gguf.quants.quantize where gguf-py has a quantizer, and are random raw bytes with sane
(finite) scale fields otherwise; both include extreme scales (fp16's largest, subnormal, negative)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from jobs.contract.errors import ModelFolderError
from jobs.paging.ggml import BLOCK_TYPES, expand, raw_shape

# Byte offsets of the fp16 scale fields in each block, from the format's layout.
SCALE_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32)
EXTREME_F16 = np.array([65504.0, -65504.0, 6e-8, -6e-8, 1e-4, 0.0, 1.0, -3.5], dtype=np.float16)


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks whose fp16 scale fields hold random finite values and the extremes above."""
    _, type_size = quants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 4, n_blocks)).astype(np.float16)
        scales[:len(EXTREME_F16)] = EXTREME_F16[:n_blocks]
        rng.shuffle(scales)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


def check_exact(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
    want = quants.dequantize(raw, qtype).reshape(shape)
    got = expand(torch.from_numpy(raw.copy()), int(qtype), shape, torch.float32)
    assert got.shape == shape and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, type_size = quants.GGML_QUANT_SIZES[qtype]
    rows = 48
    cols = block_size * 3
    raw = random_blocks(qtype, rows * 3, rng).reshape(rows, 3 * type_size)
    check_exact(raw, qtype, (rows, cols))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_values_bit_exact(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    block_size, _ = quants.GGML_QUANT_SIZES[qtype]
    rows, cols = 40, max(block_size, 32) * 4
    # rows at very different magnitudes, up to fp16's range, and a row of zeros
    magnitudes = 10.0 ** rng.uniform(-6, 4, size=(rows, 1))
    data = (rng.standard_normal((rows, cols)) * magnitudes).astype(np.float32)
    data[0] = 0.0
    data[1, :] = 6.0e4
    raw = quants.quantize(data, qtype)
    check_exact(raw.view(np.uint8).reshape(rows, -1), qtype, (rows, cols))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_float_types_with_specials():
    values = np.array([0.0, -0.0, 1.5, -2.25, 65504.0, 6e-8, np.inf, -np.inf, 1e-30, 3.0e38],
                      dtype=np.float32).reshape(1, -1)
    for qtype in (T.F32, T.F16, T.BF16):
        raw = quants.quantize(values, qtype).view(np.uint8).reshape(1, -1)
        check_exact(raw, qtype, values.shape)


def test_out_buffer_and_dtype():
    rng = np.random.default_rng(7)
    raw = torch.from_numpy(random_blocks(T.Q4_K, 8, rng)).reshape(4, 2 * 144)
    want = torch.from_numpy(quants.dequantize(raw.numpy(), T.Q4_K)).reshape(4, 512)
    buffer = torch.empty(4 * 512 + 100, dtype=torch.float16)
    out = buffer[:4 * 512].view(4, 512)
    got = expand(raw, int(T.Q4_K), (4, 512), torch.float16, out=out)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(got, want.to(torch.float16), rtol=0, atol=0)
    # a slice of rows expands on its own (what an lm_head chunk or one expert's slice is)
    part = expand(raw[1:3], int(T.Q4_K), (2, 512))
    assert torch.equal(part, want[1:3])


def test_chunking_matches(monkeypatch):
    import jobs.paging.ggml as ggml

    rng = np.random.default_rng(3)
    raw = random_blocks(T.Q6_K, 20, rng).reshape(5, 4 * 210)
    whole = expand(torch.from_numpy(raw), int(T.Q6_K), (5, 1024))
    monkeypatch.setattr(ggml, "CHUNK_ELEMENTS", 3 * 256)  # chunks that do not divide the blocks
    assert torch.equal(expand(torch.from_numpy(raw), int(T.Q6_K), (5, 1024)), whole)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, T.MXFP4, T.Q8_K, T.IQ4_NL], ids=lambda t: t.name)
def test_unsupported_type_is_refused_with_a_sentence(qtype):
    with pytest.raises(ModelFolderError, match=rf"tensor blk\.3\.ffn_up\.weight is stored as {qtype.name},"):
        raw_shape(int(qtype), (8, 256), "blk.3.ffn_up.weight")
    assert int(qtype) not in BLOCK_TYPES
