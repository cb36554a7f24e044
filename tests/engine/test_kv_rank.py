"""kv_rank_study's cache variants on Gemma-3-270M (fp32) against transformers running the same weights unstreamed:
full-rank SVD and the full cache reproduce one plain forward, masked eviction equals a cache that dropped the tokens,
agreement grows with rank, int8 is kv_cache.Int8Layer's arithmetic, and one layer's bytes are counted by hand."""
from __future__ import annotations

import copy

import pytest
import torch
from engine_helpers import REPO_ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.contract.kv_rank_inputs import load_passages
from jobs.kinds.kv_rank_study import continuation_logits, prefill, study_passage
from jobs.lib import kv_compress as kc
from jobs.paging.kv_cache import Int8Layer

pytestmark = pytest.mark.engine

CONTEXT, NEW = 96, 16     # short: the method is the same at 512, and both stay inside the 512-token window
# fp32 through 18 layers: logits of ~30 agree to ~1e-5 between two summation orders; 1e-4 is the bound.
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def reference(gemma_dir):
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gemma_dir)


@pytest.fixture(scope="module")
def ids(reference):
    passage = load_passages(REPO_ROOT / "examples" / "kv_texts")[0]
    return reference[1](passage.text, return_tensors="pt")["input_ids"][:, :CONTEXT + NEW + 1]


@pytest.fixture(scope="module")
def prefilled(reference, ids):
    cache = prefill(reference[0], ids[:, :CONTEXT])
    return cache, kc.svd_factors(cache)


def _variant(method: str, setting: int) -> kc.Variant:
    return kc.Variant(method, setting, bytes=0)


def test_full_cache_and_full_rank_svd_reproduce_one_plain_forward(reference, ids, prefilled):
    model, _ = reference
    cache, factors = prefilled
    head_dim = cache.layers[0].keys.shape[-1]
    logits = continuation_logits(model, cache, factors, [_variant(kc.FULL, 0), _variant(kc.SVD, head_dim),
                                                         _variant(kc.SVD, 8)], ids[:, CONTEXT:CONTEXT + NEW])
    with torch.no_grad():
        plain = model(input_ids=ids[:, :CONTEXT + NEW]).logits[0, CONTEXT:]
    assert (logits[0] - plain).abs().max() <= LOGIT_TOL
    assert (logits[1] - logits[0]).abs().max() <= LOGIT_TOL
    assert (logits[2] - logits[0]).abs().max() > 0.1  # a truncated rank does reach the logits
    assert cache.layers[0].keys.shape[0] == 1          # the prefilled cache itself was not touched


def test_masked_eviction_equals_a_cache_that_dropped_the_tokens(reference, ids, prefilled):
    model, _ = reference
    cache, factors = prefilled
    keep, cont = 40, ids[:, CONTEXT:CONTEXT + NEW]
    variants = [_variant(kc.LAST_N, keep), _variant(kc.SINK_LAST, keep), _variant(kc.FULL, 0)]
    masked = continuation_logits(model, cache, factors, variants, cont)
    for row, first in ((0, 0), (1, kc.SINK_TOKENS)):
        dropped = copy.deepcopy(cache)
        for layer in dropped.layers:  # cached keys carry their RoPE positions: dropping rows keeps the rest right
            layer.keys, layer.values = (torch.cat([t[:, :, :first], t[:, :, first - keep:]], dim=2)
                                        for t in (layer.keys, layer.values))
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = keep
        assert dropped.layers[0].keys.shape[2] == keep
        with torch.no_grad():
            physical = model(input_ids=cont, position_ids=torch.arange(CONTEXT, CONTEXT + NEW)[None],
                             past_key_values=dropped, use_cache=True).logits[0]
        assert (masked[row] - physical).abs().max() <= LOGIT_TOL
        assert (masked[row] - masked[2]).abs().max() > 0.1


def test_agreement_and_kl_improve_with_rank(reference, ids):
    model, _ = reference
    scored = []
    variants, scores, shapes = study_passage(model, ids, CONTEXT, NEW,
                                             lambda s: kc.plan_variants(s, (4, 64), ())[:3],  # full, r=4, r=64
                                             2, lambda n, of: scored.append((n, of)))
    by = {v.label: s for v, s in zip(variants, scores)}
    assert by["full"].agree == by["full"].positions == NEW and by["full"].kl_sum == 0
    low, high = by["svd r=4"], by["svd r=64"]
    assert high.agree >= low.agree and high.kl_sum < low.kl_sum and high.nll_sum < low.nll_sum
    assert high.energy["keys"] > low.energy["keys"] and high.energy["values"] > low.energy["values"]
    assert scored == [(2, 3), (1, 3)]  # two passes of at most 2 variants: the reference row comes first
    assert all(s.tokens == CONTEXT for s in shapes)  # under the window every layer holds the whole prefix


def test_int8_is_the_engines_int8_cache_and_fewer_bits_cost_more(prefilled):
    cache, _ = prefilled
    keys = cache.layers[5].keys
    group = kc.quant_group(keys.shape[-1])
    layer = Int8Layer(group, residual_length=1)
    assert torch.equal(kc.fake_quantize(keys, 8, group), layer._dequantize(layer._quantize(keys)))
    errors = [float((kc.fake_quantize(keys, bits, group) - keys).abs().max()) for bits in (8, 4, 2)]
    assert 0 < errors[0] < errors[1] < errors[2]
    assert kc.fake_quantize(keys, 2, group).unflatten(-1, (-1, group))[0, 0, 0, 0].unique().numel() <= 4


def test_one_layers_bytes_by_hand_and_against_real_tensors(prefilled):
    # A sliding layer of Gemma-3-270M at context 512: 511 positions, 1 KV head of 256, 16-bit storage.
    shape = kc.LayerShape(tokens=511, kv_heads=1, head_dim=256, sliding=True)
    assert kc.full_bytes(shape) == 2 * 511 * 256 * 2 == 523_264
    assert kc.svd_bytes(shape, 32) == 2 * (511 * 32 + 32 + 256 * 32) * 2 == 98_304        # U + S + V, K and V
    assert kc.svd_bytes(shape, 300) == kc.svd_bytes(shape, 256)                             # rank <= head_dim
    assert kc.quant_bytes(shape, 8) == 2 * 511 * (256 + 4 * 2 * 2) == 277_984              # codes + 4 groups' s, z
    assert kc.quant_bytes(shape, 4) == 2 * 511 * (128 + 16) == 147_168
    assert kc.quant_bytes(shape, 2) == 2 * 511 * (64 + 16) == 81_760
    assert kc.last_n_bytes(shape, 100) == 2 * 100 * 256 * 2 and kc.last_n_bytes(shape, 600) == 523_264
    # The same counts from the tensors themselves, stored 16-bit (fp16: only element sizes matter here).
    cache, factors = prefilled
    layer, real = cache.layers[0], kc.layer_shapes(cache)[0]
    u, s, vh = factors[0]["keys"]
    factor_bytes = sum(t.numel() * 2 for t in (u[..., :32], s[..., :32], vh[..., :32, :]))
    assert kc.svd_bytes(real, 32) == 2 * factor_bytes
    codes, scale, zero = Int8Layer(kc.quant_group(real.head_dim), 1)._quantize(layer.keys.half())
    stored = sum(t.numel() * t.element_size() for t in (codes, scale, zero))
    assert kc.quant_bytes(real, 8) == 2 * stored


def test_last_n_is_sized_to_each_compressed_variant():
    shapes = [kc.LayerShape(511, 1, 256, True)] * 15 + [kc.LayerShape(512, 1, 256, False)] * 3
    variants = kc.plan_variants(shapes, (4, 32), (8,))
    assert [v.label for v in variants][:4] == ["full", "svd r=4", "svd r=32", "int8"]
    assert [v.method for v in variants[4:]] == [kc.LAST_N, kc.SINK_LAST] * 3
    per_token = 18 * 2 * 256 * 2
    for v in variants[4:]:
        target = next(t for t in variants if t.label == v.matched_to)
        assert abs(v.bytes - target.bytes) <= per_token
