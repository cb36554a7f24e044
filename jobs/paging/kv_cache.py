"""Quantized KV caches for the decode loop: `make_cache()` picks transformers' cache layers per attention type.

Owns the choice of kind (fp / int8 / fp8), the per-layer mix for sliding-window models, and `kv_cache_nbytes()`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, Fp8QuantizedLayer, HQQQuantizedLayer,
                                      QuantizedCache, get_layer_types_and_kwargs)

from jobs.spec import KV_KINDS

DEFAULT_RESIDUAL_TOKENS = 128  # transformers' KIVI default: newest tokens kept unquantized before a flush
_MAX_GROUP = 64                # HQQ group along the head dimension; smaller when head_dim is not a multiple


def make_cache(config: Any, kind: str = "fp", *, residual_length: int = DEFAULT_RESIDUAL_TOKENS) -> Cache | None:
    """A fresh cache for one batch, or None for "fp" (the model then builds its own DynamicCache).

    int8: HQQ 8-bit, group-wise, with a full-precision window of `residual_length` newest tokens (KIVI).
    fp8: float8_e4m3fn storage with a per-tensor scale frozen at the prompt; no residual window. It runs on
    CPU as a storage format; only FP8-capable GPUs (Hopper and later) could also compute faster with it.
    Sliding-window layers stay full precision: they are capped at the window, the growth is elsewhere.
    """
    if kind not in KV_KINDS:
        raise ValueError(f"kv cache kind {kind!r} is not one of {', '.join(KV_KINDS)}; use fp for the plain cache")
    if kind == "fp":
        return None
    if residual_length < 1:
        raise ValueError(f"residual_length must be >= 1 token, got {residual_length}")
    text = config.get_text_config(decoder=True)
    layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # axis=1 groups consecutive channels of one token and head: independent of batch and padding, and
    # gcd() keeps every tensor's size a multiple of the group, which HQQ asserts.
    hqq_kwargs = dict(nbits=8, axis_key=1, axis_value=1, q_group_size=math.gcd(_MAX_GROUP, head_dim),
                      residual_length=residual_length)
    if all(t == "full_attention" for t in layer_types):
        if kind == "int8":
            return QuantizedCache("hqq", text, **hqq_kwargs)
        return QuantizedCache("fp8", text)
    layers = []
    for layer_type, kwargs in zip(layer_types, per_layer_kwargs):
        if layer_type == "full_attention":
            layers.append(HQQQuantizedLayer(**hqq_kwargs) if kind == "int8" else Fp8QuantizedLayer())
        elif layer_type in ("sliding_attention", "chunked_attention"):
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        else:
            raise ValueError(f"a {kind} kv cache supports full and sliding attention layers, not {layer_type!r} "
                             f"({text.model_type}); use --kv-cache fp for this model")
    return Cache(layers=layers)


def kv_layer_nbytes(cache: Cache) -> list[int]:
    """Bytes each layer really holds: fp keys/values (the residual window for quantized layers), quantized
    codes, and their scales and zeros."""
    sizes = []
    for layer in cache.layers:
        seen: set[int] = set()
        total = 0
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None), seen)
        sizes.append(total)
    return sizes


def kv_cache_nbytes(cache: Cache | None) -> int:
    """Total bytes held by the cache's layers (0 for None)."""
    return 0 if cache is None else sum(kv_layer_nbytes(cache))


def quantized_nbytes(cache: Cache | None) -> int:
    """Bytes of quantized codes alone: 0 when quantization never ran."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values"):
            stored = getattr(layer, name, None)
            if stored is not None:
                total += _tensor_bytes(stored[0], set())
    return total


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Sum over the tensors in obj (tuples and HQQ meta dicts included), each storage counted once.

    Whole storages, not views: a sliding layer keeps a slice of the concatenated states, which pins all of it.
    """
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or obj.numel() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    return 0
