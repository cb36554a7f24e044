"""Dense streaming from a GGUF file against transformers' own fp32 load of the same file (the definition
of correct for GGUF): the embedded Gemma-3-270M Q4_K_M, and tiny random llama / qwen3 GGUFs written here
with gguf-py, holding legacy (Q4_0/Q5_0/Q8_0) and k-quant (Q4_K/Q6_K) blocks."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from engine_helpers import PROMPTS, resident_greedy
from gguf import GGMLQuantizationType as T
from test_ggml import random_blocks

from jobs.contract.errors import ModelFolderError, SettingError
from jobs.paging.convert import import_gguf
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.generate import generate
from jobs.paging.open import spec_for
from jobs.paging.plan.shape import shape_from_path

GEMMA_PROMPTS = [*PROMPTS, "Water boils at a temperature of", "My favourite book is"]
MiB = 1 << 20


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    return import_gguf()


def _reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


# Both loads parse the 262k-token vocabulary with gguf-py (about a minute each on a 2-core machine), and
# transformers' reference dequantizes the whole file: past the suite's 10-minute default on a busy box.
@pytest.mark.timeout(1800)
def test_embedded_gguf_streams_exact_tokens_in_a_third_of_the_bytes(gemma_gguf, gemma_dir):
    # The plan counts a layer as its blocks (3.8 MiB here): a budget of two slots and not three keeps no
    # layer resident; no RAM cache: every pass reads the file
    layer = shape_from_path(gemma_gguf).layer_stored_bytes
    with load_streamed(spec_for(gemma_gguf, vram_budget_bytes=2 * layer + layer // 2,
                                ram_budget_bytes=None)) as loaded:
        stats = loaded.stats()
        assert stats["resident_layers"] == 0 and stats["ram_cache_layers"] == 0
        result = generate(loaded, GEMMA_PROMPTS, max_new_tokens=8, batch_size=len(GEMMA_PROMPTS))
        after = loaded.stats()
    reference = _reference(gemma_gguf)
    want = resident_greedy(reference, loaded.tokenizer, GEMMA_PROMPTS, 8)
    assert [c.token_ids for c in result.outputs] == want
    # bytes read per pass: the streamed layers' blocks, against the converted bf16 folder's layers
    bf16_bytes = sum(ModelStore(gemma_dir).layer_nbytes)
    per_pass = after["bytes_read_per_pass"]
    assert per_pass == sum(loaded._store.layer_nbytes)  # every layer streamed, as stored in the file
    # what was read: each pass's layers, plus what prefetch read ahead for a next pass (at most its 2 slots)
    read = after["bytes_read"] - stats["bytes_read"]
    assert result.weight_passes * per_pass <= read <= (result.weight_passes + 1) * per_pass
    assert per_pass <= 0.4 * bf16_bytes, (per_pass, bf16_bytes)


# -- tiny random GGUFs ------------------------------------------------------------------------------
# head_dim 128: transformers reads no head_dim from a qwen3 GGUF and takes its default, 128
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 2, 1, 3
TOKENS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", ".", ",", "th"]
VOCAB = len(TOKENS) + 3  # + <pad> <eos> <bos>
TYPES = {"attn_q": T.Q4_0, "attn_k": T.Q5_0, "attn_v": T.Q8_0, "attn_output": T.Q4_K,
         "ffn_gate": T.Q6_K, "ffn_up": T.Q4_K, "ffn_down": T.Q6_K}
# sane fp16 scales for random k-quant blocks (gguf-py has no k-quant quantizer): weights of order 0.1
K_SCALES = {T.Q4_K: (3e-4, 1e-4), T.Q6_K: (2e-4,)}


def _blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in K_SCALES:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = random_blocks(qtype, rows * cols // block_size, rng)
        fields = {T.Q4_K: (0, 2), T.Q6_K: (208,)}[qtype]
        for offset, scale in zip(fields, K_SCALES[qtype]):
            raw[:, offset:offset + 2] = np.full(len(raw), scale, np.float16).view(np.uint8).reshape(-1, 2)
        return raw.reshape(rows, -1)
    return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.08).astype(np.float32), qtype)


def add_tiny_tokenizer(w: gguf.GGUFWriter) -> None:
    """The tiny GGUFs' byte-level BPE vocabulary (TOKENS after <pad> <eos> <bos>), one merge."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<pad>", "<eos>", "<bos>", *TOKENS])
    w.add_token_types([3, 3, 3] + [1] * len(TOKENS))
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges(["t h"])
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_bos_token_id(2)


def write_out(w: gguf.GGUFWriter) -> None:
    """Header, metadata and tensors to the file(s), then close."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(path: Path, arch: str, seed: int, split_max_tensors: int = 0) -> Path:
    """A tiny random GGUF at `path`; with `split_max_tensors`, gguf-py's split parts of the same tensors
    (NAME-00001-of-0000N.gguf beside `path`), and the first part is returned."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    add_tiny_tokenizer(w)
    head_dim = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
              "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    w.add_tensor("token_embd.weight", _blocks(T.Q8_0, VOCAB, HIDDEN, rng), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.add_tensor("output.weight", _blocks(T.Q4_0, VOCAB, HIDDEN, rng), raw_dtype=T.Q4_0)
    for i in range(LAYERS):
        for name, (rows, cols) in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(TYPES[name], rows, cols, rng), raw_dtype=TYPES[name])
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        if arch == "qwen3":
            for norm in ("attn_q_norm", "attn_k_norm"):
                w.add_tensor(f"blk.{i}.{norm}.weight",
                             (1 + 0.1 * rng.standard_normal(head_dim)).astype(np.float32))
    write_out(w)
    return path.with_name(f"{path.stem}-00001-of-{len(w.tensors):05d}.gguf") if split_max_tensors else path


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_gguf_matches_transformers(tmp_path, arch):
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, seed=len(arch))
    reference = _reference(path)
    ids = torch.tensor([[2, 5, 9, 14, 3, 20, 7, 11, 29, 4], [2, 8, 8, 15, 22, 6, 30, 12, 9, 3]])
    # one layer's blocks per slot, no layer resident, no RAM cache, then with a RAM cache: a budget for
    # two slots of one layer's blocks (the plan counts blocks, not expanded weights) but not three layers
    budget = 2 * shape_from_path(path).layer_stored_bytes + shape_from_path(path).layer_stored_bytes // 2
    for ram in (None, 1 << 30):
        with load_streamed(spec_for(path, vram_budget_bytes=budget, ram_budget_bytes=ram)) as loaded:
            assert loaded.stats()["resident_layers"] == 0
            with torch.no_grad():
                got = loaded.model(input_ids=ids).logits
                want = reference(input_ids=ids).logits
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
                # greedy continuation, token by token on the full sequence
                seq_got, seq_want = ids, ids
                for _ in range(6):
                    seq_got = torch.cat([seq_got, loaded.model(input_ids=seq_got).logits[:, -1:].argmax(-1)], 1)
                    seq_want = torch.cat([seq_want, reference(input_ids=seq_want).logits[:, -1:].argmax(-1)], 1)
                assert torch.equal(seq_got, seq_want)


def test_resident_layers_expand_once_when_nothing_streams_and_stay_blocks_when_layers_stream(tmp_path,
                                                                                           monkeypatch):
    """The plan's choice for resident GGUF layers: room for every layer's blocks plus k expanded copies
    keeps k layers expanded (each Linear expanded once, at first use), and room for all of them plus the
    head keeps the head expanded too; a budget that streams any layer keeps every layer in blocks and the
    head in chunks. Logits equal transformers' load either way."""
    from jobs.paging import block_weights

    path = write_tiny_gguf(tmp_path / "tiny-qwen3.gguf", "qwen3", seed=3)
    reference = _reference(path)
    shape = shape_from_path(path)
    blocks, expanded, head = shape.layer_stored_bytes, shape.layer_numel * 4, VOCAB * HIDDEN * 4
    ids = torch.tensor([[2, 5, 9, 14, 3, 20, 7, 11], [2, 8, 8, 15, 22, 6, 30, 12]])
    calls: list[tuple[str, bool]] = []   # (decoder or head, expanded into a tensor of its own)
    real = block_weights.expand

    def counting(*a, **k):   # the embedding expands its looked-up rows its own way: not counted
        if k["tensor_name"] != "token_embd.weight":
            calls.append(("head" if k["tensor_name"] == "output.weight" else "blk", k.get("out") is None))
        return real(*a, **k)
    monkeypatch.setattr(block_weights, "expand", counting)
    linears = 7   # q, k, v, o, gate, up, down per layer
    full = LAYERS * (blocks + expanded)
    for budget, want_layers, want_head in ((LAYERS * blocks + expanded + expanded // 2, 1, False),
                                           (full + head - 1, LAYERS, False),
                                           (full + head, LAYERS, True),
                                           (2 * blocks + blocks // 2, 0, False)):     # layers stream
        calls.clear()
        with load_streamed(spec_for(path, vram_budget_bytes=budget, ram_budget_bytes=None)) as loaded:
            stats = loaded.stats()
            assert stats["expanded_layers"] == loaded.plan.expanded_layers == want_layers
            assert stats["expanded_head"] is want_head
            assert any(r["item"] == "expanded resident layers" for r in loaded.plan.rows) == bool(want_layers)
            with torch.no_grad():
                for _ in range(2):   # two passes: what is kept expands in the first only
                    torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                               rtol=0, atol=1e-4)
        blk = [own for what, own in calls if what == "blk"]
        assert sum(blk) == want_layers * linears
        assert len(blk) - sum(blk) == 2 * (LAYERS - want_layers) * linears
        assert [own for what, own in calls if what == "head"] == ([True] if want_head else [False, False])


def test_llama_q_k_rows_follow_transformers_order(tmp_path):
    """llama.cpp stores q/k rows permuted for its rope; transformers undoes it, and so must the streamer."""
    from jobs.paging.gguf_file import GgufFile

    path = write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", seed=5)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(GgufFile(path).config)
    tensors = GgufFile(path).map_names(model)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.rows is not None and not torch.equal(q.rows, torch.arange(HIDDEN))
    assert tensors["model.layers.0.self_attn.v_proj.weight"].rows is None


def test_unsupported_block_type_is_refused_naming_type_and_tensor(tmp_path):
    path = tmp_path / "iq.gguf"
    write_tiny_gguf(path, "llama", seed=1)
    data = bytearray(path.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(T.Q4_K)
    data[type_at:type_at + 4] = int(T.IQ4_XS).to_bytes(4, "little")  # same 256-element blocks, 136 bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=r"tensor blk\.1\.ffn_up\.weight is stored as IQ4_XS"):
        load_streamed(spec_for(path))


def test_a_split_gguf_streams_as_the_whole_file_and_a_missing_part_is_named(tmp_path):
    """Any part of a split GGUF names the model (config and tokenizer from the first part, blocks from the
    part that holds them): logits equal transformers' own load of the same tensors written as one file."""
    (tmp_path / "whole").mkdir(), (tmp_path / "split").mkdir()
    whole = write_tiny_gguf(tmp_path / "whole" / "tiny.gguf", "llama", seed=2)
    first = write_tiny_gguf(tmp_path / "split" / "tiny.gguf", "llama", seed=2, split_max_tensors=12)
    parts = sorted(first.parent.glob("tiny-*-of-*.gguf"))
    assert len(parts) == 3 and parts[0] == first
    reference = _reference(whole)
    ids = torch.tensor([[2, 5, 9, 14, 3, 20, 7, 11], [2, 8, 8, 15, 22, 6, 30, 12]])
    layer = shape_from_path(first).layer_stored_bytes
    assert shape_from_path(parts[2]).layer_stored_bytes == layer == shape_from_path(whole).layer_stored_bytes
    with load_streamed(spec_for(parts[1], vram_budget_bytes=2 * layer + layer // 2)) as loaded:
        assert loaded.stats()["resident_layers"] == 0
        assert loaded.tokenizer("th t h").input_ids == reference_tokens(whole, "th t h")
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=0, atol=1e-4)
    parts[2].unlink()
    with pytest.raises(SettingError, match="tiny-00002-of-00003.gguf is missing tiny-00003-of-00003.gguf"):
        load_streamed(spec_for(parts[1]))


def reference_tokens(path: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(text).input_ids
