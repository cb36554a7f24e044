"""Expert paging straight from a MoE GGUF file against transformers' own fp32 load of the same file: tiny
random Qwen3-MoE and Qwen2-MoE (shared expert, its sigmoid gate, q/k/v biases) files written here with gguf-py,
legacy (Q4_0/Q5_0/Q8_0) and k-quant (Q4_K/Q6_K) blocks on both the experts and the dense weights; each expert is
its slice of the fused blocks in the store and the cache."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T
from test_gguf_stream import VOCAB, _blocks, add_tiny_tokenizer, write_out

from jobs.contract.errors import ModelFolderError
from jobs.paging.moe.gguf_experts import GgufExpertStore
from jobs.paging.moe.load import load_paged_moe
from jobs.paging.open import spec_for
from jobs.paging.plan.expert_budget import slot_bytes
from jobs.paging.plan.settings import is_moe_folder
from jobs.paging.plan.shape import shape_from_path

pytestmark = pytest.mark.engine

HIDDEN, EXPERTS, TOP_K, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 8, 2, 2, 2, 1, 128
ATTENTION = {"attn_q": (T.Q4_0, HEADS * HEAD_DIM, HIDDEN), "attn_k": (T.Q5_0, KV_HEADS * HEAD_DIM, HIDDEN),
             "attn_v": (T.Q8_0, KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (T.Q4_K, HIDDEN, HEADS * HEAD_DIM)}
IDS = torch.tensor([[2, 5, 9, 14, 3, 20, 7, 11, 29, 4, 17, 8], [2, 8, 8, 15, 22, 6, 30, 12, 9, 3, 25, 19]])


@dataclass(frozen=True)
class Family:
    arch: str
    # transformers maps no expert_feed_forward_length (nor the shared one) for these GGUFs: its load takes the
    # config class's defaults, which the file must match to be loaded at all
    expert_inter: int
    expert_types: tuple[dict[str, T], ...]   # per layer: Q4_K_M files change ffn_down's type between layers
    shared_inter: int = 0                    # Qwen2-MoE's shared expert
    qk_norm: bool = False                    # Qwen3's per-head q/k RMSNorm
    qkv_bias: bool = False

    @property
    def expert_numel(self) -> int:
        return 3 * HIDDEN * self.expert_inter


QWEN3 = Family("qwen3moe", 768, ({"gate": T.Q4_K, "up": T.Q5_0, "down": T.Q6_K},
                                 {"gate": T.Q8_0, "up": T.Q4_K, "down": T.Q4_0}), qk_norm=True)
# 1408 is no multiple of 256: ffn_down's rows (1408 wide) take legacy blocks only
QWEN2 = Family("qwen2moe", 1408, ({"gate": T.Q4_K, "up": T.Q5_0, "down": T.Q8_0},
                                  {"gate": T.Q6_K, "up": T.Q4_0, "down": T.Q5_0}), shared_inter=5632, qkv_bias=True)


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def write_moe_gguf(path: Path, family: Family, arch: str | None = None, seed: int = 0) -> Path:
    """`arch`: the architecture written in the header, when not the family's own."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch or family.arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(4 * HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(TOP_K)
    w.add_expert_feed_forward_length(family.expert_inter)
    if family.shared_inter:
        w.add_expert_shared_feed_forward_length(family.shared_inter)
    add_tiny_tokenizer(w)
    w.add_tensor("token_embd.weight", _blocks(T.Q8_0, VOCAB, HIDDEN, rng), raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", _norm(rng, HIDDEN))
    w.add_tensor("output.weight", _blocks(T.Q6_K, VOCAB, HIDDEN, rng), raw_dtype=T.Q6_K)
    for i in range(LAYERS):
        for name, (qtype, rows, cols) in ATTENTION.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(qtype, rows, cols, rng), raw_dtype=qtype)
            if family.qkv_bias and name != "attn_output":
                w.add_tensor(f"blk.{i}.{name}.bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_norm.weight", _norm(rng, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", _norm(rng, HIDDEN))
        if family.qk_norm:
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", _norm(rng, HEAD_DIM))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", _norm(rng, HEAD_DIM))
        # the router as llama.cpp writes it (F32), spread enough that routing has no near-ties
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", (0.3 * rng.standard_normal((EXPERTS, HIDDEN))).astype(np.float32))
        if family.shared_inter:   # a plain MLP (resident blocks) and its gate, stored 1-D
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", (0.3 * rng.standard_normal(HIDDEN)).astype(np.float32))
            for proj, qtype in (("gate", T.Q4_K), ("up", T.Q5_0), ("down", T.Q6_K)):
                rows, cols = (HIDDEN, family.shared_inter) if proj == "down" else (family.shared_inter, HIDDEN)
                w.add_tensor(f"blk.{i}.ffn_{proj}_shexp.weight", _blocks(qtype, rows, cols, rng), raw_dtype=qtype)
        for proj, qtype in family.expert_types[i].items():
            rows, cols = (HIDDEN, family.expert_inter) if proj == "down" else (family.expert_inter, HIDDEN)
            fused = np.stack([_blocks(qtype, rows, cols, rng) for _ in range(EXPERTS)])  # [E, rows, row bytes]
            w.add_tensor(f"blk.{i}.ffn_{proj}_exps.weight", fused, raw_dtype=qtype)
    write_out(w)
    return path


@pytest.fixture(scope="module", params=[QWEN3, QWEN2], ids=lambda f: f.arch)
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory, family) -> Path:
    return write_moe_gguf(tmp_path_factory.mktemp("gguf-moe") / f"tiny-{family.arch}.gguf", family)


@pytest.fixture(scope="module")
def reference(moe_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(moe_gguf.parent, gguf_file=moe_gguf.name,
                                                             dtype=torch.float32).eval()


def expert_slice_bytes(path: Path) -> dict[int, int]:
    """Per layer, one expert's bytes of its three fused tensors, as gguf-py's reader counts them."""
    out: dict[int, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if "_exps" in t.name:
            layer = int(t.name.split(".")[1])
            out[layer] = out.get(layer, 0) + int(t.n_bytes) // EXPERTS
    return out


def distinct_routed(router_logits, tokens: int | None = None) -> list[int]:
    """Experts each layer routes at least one token to (top-k of its router logits, near-ties excluded)."""
    used = []
    for logits in router_logits:
        top = logits.topk(TOP_K + 1, dim=-1).values
        assert (top[:, TOP_K - 1] - top[:, TOP_K]).min() > 1e-4, "a near-tie in routing: choose another seed"
        used.append(len(set(logits.topk(TOP_K, dim=-1).indices.flatten().tolist())))
    return used


def test_header_says_moe_and_the_plan_counts_experts_at_their_block_bytes(moe_gguf, family):
    assert is_moe_folder(moe_gguf) and spec_for(moe_gguf).kind == "moe"
    shape = shape_from_path(moe_gguf)
    per_layer = expert_slice_bytes(moe_gguf)
    assert shape.gguf and shape.num_experts == EXPERTS and shape.moe_layers == LAYERS
    assert shape.expert_stored_bytes == max(per_layer.values())
    assert shape.expert_numel == family.expert_numel


@pytest.mark.parametrize("slots,prefetch,ram_experts", [
    (2, True, None),                  # evictions within a layer, look-ahead prefetch
    (5, False, 3),                    # most experts read from the file on demand through the staging ring
    (LAYERS * EXPERTS, True, None),   # every expert fits the cache
])
def test_paged_gguf_moe_matches_transformers(moe_gguf, reference, slots, prefetch, ram_experts):
    slot = max(expert_slice_bytes(moe_gguf).values())
    ram = None if ram_experts is None else (ram_experts + 2) * slot_bytes(slot)  # + the 2 staging slots
    spec = spec_for(moe_gguf, expert_cache_bytes=slots * slot, ram_budget_bytes=ram)
    with load_paged_moe(spec, prefetch=prefetch) as paged, torch.no_grad():
        assert isinstance(paged.store, GgufExpertStore) and paged.cache.capacity == slots
        got, want = paged.model(input_ids=IDS).logits, reference(input_ids=IDS).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(paged.model.generate(IDS, **kwargs), reference.generate(IDS, **kwargs))
        s = paged.stats()
        assert s["expert_variant"] == "gguf blocks" and s["misses"] > 0
        assert (s["evictions"] > 0) == (slots < LAYERS * EXPERTS)
        if ram_experts is not None:
            assert s["experts_in_ram"] == ram_experts and s["disk_reads"] > 0


def test_cache_counters_follow_the_routing(moe_gguf):
    """Room for every expert and no prefetch: a forward misses each distinct expert its routing uses once
    per layer, and a second forward on fewer tokens hits each of its distinct experts once per layer."""
    with load_paged_moe(spec_for(moe_gguf), prefetch=False) as paged, torch.no_grad():
        routed = distinct_routed(paged.model(input_ids=IDS, output_router_logits=True).router_logits)
        after_first = paged.stats()
        short = distinct_routed(paged.model(input_ids=IDS[:, :4], output_router_logits=True).router_logits)
        s = paged.stats()
    assert [after_first["per_layer"][i]["misses"] for i in range(LAYERS)] == routed
    assert [after_first["per_layer"][i]["hits"] for i in range(LAYERS)] == [0] * LAYERS
    assert [s["per_layer"][i]["hits"] for i in range(LAYERS)] == short
    assert s["misses"] == sum(routed) and s["hits"] + s["misses"] == sum(routed) + sum(short)
    # what crossed: one slot of blocks per miss, nothing per hit
    assert s["bytes_h2d"] == s["misses"] * s["expert_bytes"]


def test_an_expert_holds_exactly_its_slice_of_blocks(moe_gguf, family, reference):
    per_layer = expert_slice_bytes(moe_gguf)
    with load_paged_moe(spec_for(moe_gguf), prefetch=False) as paged:
        store = paged.store
        assert isinstance(store, GgufExpertStore)
        assert store.layer_expert_bytes == per_layer
        # one slot is the largest layer's expert; a slot holds blocks, not expanded weights
        assert store.expert_bytes == max(per_layer.values()) and store.slot_dtype == torch.uint8
        assert paged.cache.allocated_bytes == paged.cache.capacity * store.expert_bytes
        assert store.stats()["host_ram_bytes"] == LAYERS * EXPERTS * slot_bytes(store.expert_bytes)
        # bits per weight as stored (of the larger layer), not fp16's 16
        bits = paged.stats()["expert_bits"]
        assert bits == pytest.approx(8 * max(per_layer.values()) / family.expert_numel, abs=1e-3) and bits < 7
        # the expert store's buffer expands to transformers' own weights, exactly
        for layer in range(LAYERS):
            for expert in (0, EXPERTS - 1):
                gate_up, down = store.weights((layer, expert))
                mine = reference.model.layers[layer].mlp.experts
                assert torch.equal(gate_up, mine.gate_up_proj[expert]) and torch.equal(down, mine.down_proj[expert])


def test_a_moe_gguf_transformers_reads_without_experts_is_refused_by_architecture(tmp_path):
    """Mixtral's GGUFs say `llama` with an expert_count; transformers reads them as a dense Llama."""
    path = write_moe_gguf(tmp_path / "mixtral-like.gguf", QWEN3, arch="llama")
    assert is_moe_folder(path)
    with pytest.raises(ModelFolderError, match=r"mixtral-like\.gguf is a llama GGUF with 8 routed experts"):
        load_paged_moe(spec_for(path))
