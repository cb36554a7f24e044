"""Compressed stand-ins for a prefilled KV cache, for measuring what compression costs the next token: truncated
SVD per layer, head, K and V; group-wise int8/int4/int2 codes; keeping only the last N tokens (or those plus the
first few); and the bytes each holds.

Every variant is simulated on a copy of transformers' own cache: low-rank and quantized tensors are rebuilt to the
cache's shape (the model runs on them unchanged), evicted tokens are masked out of attention. Bytes are counted for
what each variant would store, with every float at STORAGE_FLOAT_BYTES (a 16-bit cache, as the GPU engine keeps it).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

STORAGE_FLOAT_BYTES = 2   # bf16/fp16: the full cache, SVD factors, and quantization scales and zeros
QUANT_GROUP = 64          # channels of one token and head per scale/zero, as kv_cache.Int8Layer (gcd with head_dim)
SINK_TOKENS = 4           # SINK_LAST keeps the first tokens too: attention sinks (StreamingLLM), BOS among them
FULL, SVD, INT, LAST_N, SINK_LAST = "full", "svd", "int", "last_n", "sink_last"


@dataclass(frozen=True)
class LayerShape:
    tokens: int               # positions the layer's cache holds (a sliding layer: at most window - 1)
    kv_heads: int
    head_dim: int
    sliding: bool


@dataclass(frozen=True)
class Variant:
    method: str               # FULL | SVD | INT | LAST_N | SINK_LAST
    setting: int              # SVD: rank; INT: bits; LAST_N, SINK_LAST: tokens kept; FULL: 0
    bytes: int                # what the compressed prefix cache would store, all layers
    matched_to: str = ""      # LAST_N, SINK_LAST: the variant whose bytes it was sized to match

    @property
    def label(self) -> str:
        return {FULL: "full", SVD: f"svd r={self.setting}", INT: f"int{self.setting}",
                LAST_N: f"last {self.setting}",
                SINK_LAST: f"first {SINK_TOKENS} + last {self.setting - SINK_TOKENS}"}[self.method]


def layer_shapes(cache: Any) -> list[LayerShape]:
    """Shapes of a batch-1 transformers cache (DynamicCache: full and sliding-window layers)."""
    return [LayerShape(tokens=layer.keys.shape[-2], kv_heads=layer.keys.shape[1], head_dim=layer.keys.shape[-1],
                       sliding=bool(getattr(layer, "is_sliding", False))) for layer in cache.layers]


def quant_group(head_dim: int) -> int:
    return math.gcd(QUANT_GROUP, head_dim)


# -- bytes -----------------------------------------------------------------------------------------------------
def full_bytes(shape: LayerShape) -> int:
    """K and V of every head: tokens x head_dim floats each."""
    return 2 * shape.kv_heads * shape.tokens * shape.head_dim * STORAGE_FLOAT_BYTES


def svd_bytes(shape: LayerShape, rank: int) -> int:
    """K and V of every head as U (tokens x r), S (r) and V (head_dim x r), all stored: nothing folded away."""
    r = effective_rank(shape, rank)
    return 2 * shape.kv_heads * (shape.tokens * r + r + shape.head_dim * r) * STORAGE_FLOAT_BYTES


def quant_bytes(shape: LayerShape, bits: int) -> int:
    """K and V of every head: bits per channel in codes, plus a scale and a zero per group of channels."""
    groups = shape.head_dim // quant_group(shape.head_dim)
    per_token = shape.head_dim * bits / 8 + 2 * groups * STORAGE_FLOAT_BYTES
    return int(2 * shape.kv_heads * shape.tokens * per_token)


def last_n_bytes(shape: LayerShape, keep: int) -> int:
    return 2 * shape.kv_heads * min(keep, shape.tokens) * shape.head_dim * STORAGE_FLOAT_BYTES


def effective_rank(shape: LayerShape, rank: int) -> int:
    """A tokens x head_dim matrix has rank at most min(tokens, head_dim); more is the full matrix."""
    return min(rank, shape.tokens, shape.head_dim)


def match_last_n(shapes: Sequence[LayerShape], target_bytes: int) -> int:
    """Tokens to keep so the evicted cache's bytes come closest to target_bytes (ties: fewer tokens)."""
    longest = max(s.tokens for s in shapes)
    return min(range(1, longest + 1),
               key=lambda n: (abs(sum(last_n_bytes(s, n) for s in shapes) - target_bytes), n))


def plan_variants(shapes: Sequence[LayerShape], ranks: Sequence[int], bits: Sequence[int]) -> list[Variant]:
    """full, one SVD per rank, one quantization per bit width, then last-N, and the first SINK_TOKENS plus the
    last N - SINK_TOKENS, sized to each of those (deduplicated)."""
    total = lambda fn, arg: sum(fn(s, arg) for s in shapes)  # noqa: E731 - a local sum over layers
    out = [Variant(FULL, 0, sum(full_bytes(s) for s in shapes))]
    out += [Variant(SVD, r, total(svd_bytes, r)) for r in ranks]
    out += [Variant(INT, b, total(quant_bytes, b)) for b in bits]
    seen: set[int] = set()
    for target in out[1:]:
        keep = match_last_n(shapes, target.bytes)
        if keep not in seen:
            seen.add(keep)
            out.append(Variant(LAST_N, keep, total(last_n_bytes, keep), matched_to=target.label))
            if keep > SINK_TOKENS:
                out.append(Variant(SINK_LAST, keep, total(last_n_bytes, keep), matched_to=target.label))
    return out


# -- tensors ---------------------------------------------------------------------------------------------------
def svd_factors(cache: Any) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per layer, for "keys" and "values": U [1, H, T, k], S [1, H, k], Vh [1, H, k, d] in fp32 (k = min(T, d)),
    the thin SVD of each head's T x d matrix (rows: cached positions; columns: channels, keys after RoPE)."""
    out = []
    for layer in cache.layers:
        out.append({name: torch.linalg.svd(getattr(layer, name).float(), full_matrices=False)
                    for name in ("keys", "values")})
    return out


def low_rank(factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int) -> torch.Tensor:
    """U_r diag(S_r) Vh_r in fp32: the best rank-r approximation of each head's matrix (Eckart-Young)."""
    u, s, vh = factors
    r = min(rank, s.shape[-1])
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


def kept_energy(factors: list[dict[str, tuple]], rank: int) -> dict[str, float]:
    """Share of each head's squared Frobenius norm that rank r keeps (sum of the top r S^2 over all), averaged
    over layers and heads, for keys and values: how low-rank the cache is, apart from what the model makes of it."""
    out = {}
    for name in ("keys", "values"):
        shares = [(s[..., :rank] ** 2).sum(-1) / (s ** 2).sum(-1).clamp(min=torch.finfo(s.dtype).tiny)
                  for _, s, _ in (layer[name] for layer in factors)]
        out[name] = float(torch.cat([x.flatten() for x in shares]).mean())
    return out


def fake_quantize(tensor: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Min-max codes of `bits` per channel in groups of `group` channels of one token and head, decoded back.

    At 8 bits this is kv_cache.Int8Layer's arithmetic exactly (scale rounded up a little, scale and zero held in
    the tensor's dtype), so the baseline is the cache the engine already ships, whatever the width."""
    levels = 2 ** bits - 1
    groups = tensor.float().unflatten(-1, (-1, group))
    low, high = groups.amin(-1), groups.amax(-1)
    eps = torch.finfo(tensor.dtype).eps
    scale = ((high - low) / levels * (1 + 2 * eps)).clamp(min=torch.finfo(tensor.dtype).tiny)
    scale, zero = scale.to(tensor.dtype).float()[..., None], low.to(tensor.dtype).float()[..., None]
    codes = ((groups - zero) / scale).round_().clamp_(0, levels)
    return (codes * scale + zero).flatten(-2).to(tensor.dtype)


def variant_states(variant: Variant, layer: Any, factors: dict[str, tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer as `variant` would give them back, in the cache's shape and dtype.
    LAST_N and SINK_LAST return the full states: their evicted positions are masked (eviction_mask), not removed."""
    keys, values = layer.keys, layer.values
    if variant.method == SVD:
        return (low_rank(factors["keys"], variant.setting).to(keys.dtype),
                low_rank(factors["values"], variant.setting).to(values.dtype))
    if variant.method == INT:
        group = quant_group(keys.shape[-1])
        return fake_quantize(keys, variant.setting, group), fake_quantize(values, variant.setting, group)
    return keys, values


def eviction_mask(variant: Variant, prefix_tokens: int, new_tokens: int, device: torch.device) -> torch.Tensor:
    """A [1, prefix + new] attention mask: 0 on the prefix positions LAST_N evicted (the oldest) or SINK_LAST
    evicted (the oldest after the first SINK_TOKENS), 1 elsewhere."""
    mask = torch.ones(1, prefix_tokens + new_tokens, dtype=torch.long, device=device)
    if variant.method == LAST_N:
        mask[:, :max(0, prefix_tokens - variant.setting)] = 0
    elif variant.method == SINK_LAST:
        mask[:, SINK_TOKENS:max(SINK_TOKENS, prefix_tokens - variant.setting + SINK_TOKENS)] = 0
    return mask


def batched_cache(cache: Any, variants: Sequence[Variant], factors: list[dict[str, tuple]]) -> Any:
    """A copy of the batch-1 `cache` with one row per variant (row i: variants[i]'s states, every layer).
    Sliding-window layers are compressed like full ones: what they hold is the last window - 1 positions."""
    out = copy.deepcopy(cache)
    for layer, src, layer_factors in zip(out.layers, cache.layers, factors):
        rows = [variant_states(v, src, layer_factors) for v in variants]
        layer.keys = torch.cat([k for k, _ in rows], dim=0)
        layer.values = torch.cat([v for _, v in rows], dim=0)
    return out
