"""Quantized KV caches for the decode loop: `make_cache()` builds them from transformers' cache layers, subclassed.

Owns the choice of kind (fp / int8 / fp8), the two quantized layers (per-token scales, quantize each token once),
the per-layer mix for sliding-window models, and `kv_cache_nbytes()`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    Fp8QuantizedLayer,
    QuantizedLayer,
    get_layer_types_and_kwargs,
)

from jobs.contract.spec import KV_KINDS
from jobs.paging import capability

DEFAULT_RESIDUAL_TOKENS = 128  # transformers' KIVI default: newest tokens kept unquantized before a flush
_MAX_GROUP = 64                # int8 group along the head dimension; smaller when head_dim is not a multiple
_INT8_LEVELS = 255


class TokenFp8Layer(Fp8QuantizedLayer):
    """transformers' FP8 layer with one scale per token and head instead of one per tensor frozen at the prompt:
    a later token larger than the prompt's range gets its own scale, so nothing clips and nothing becomes NaN.
    Codes and scales are appended, never re-quantized. `_quantized_*` stay (codes, scales) as in the parent."""

    def __init__(self):
        super().__init__()
        self.quantized_tokens = 0  # tokens x batch rows quantized so far: each exactly once

    def _quantize(self, tensor, scale=None):
        # `scale` is the parent's frozen one; every token here gets the scale of its own amplitude.
        self.quantized_tokens += tensor.shape[-2] * tensor.shape[0]
        scale = (tensor.abs().amax(-1, keepdim=True).float() / self.fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
        return (tensor.float() / scale).to(self.fp8_dtype), scale

    def update(self, key_states, value_states, *args, **kwargs):
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        self._quantized_keys = _append(self._quantized_keys, self._quantize(key_states))
        self._quantized_values = _append(self._quantized_values, self._quantize(value_states))
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._quantized_keys = _select(self._quantized_keys, beam_idx)
            self._quantized_values = _select(self._quantized_values, beam_idx)


class Int8Layer(QuantizedLayer):
    """transformers' KIVI layer (a full-precision window of the newest `residual_length` tokens) with 8-bit
    min-max groups of `q_group_size` channels of one token and head. Groups never span tokens, so a flush
    quantizes only the window's tokens and appends them: each token is quantized once (transformers' HQQ layer
    re-quantized the whole history at every flush, ~1 GB of temporaries at 27B). `_quantized_*` are
    (codes uint8 [B, H, T, D], scale, zero [B, H, T, D / group]) with scale and zero in the compute dtype."""

    def __init__(self, q_group_size: int, residual_length: int):
        super().__init__(nbits=8, q_group_size=q_group_size, residual_length=residual_length)
        self.quantized_tokens = 0  # tokens x batch rows quantized so far: each exactly once

    def _quantize(self, tensor, axis=None):
        self.quantized_tokens += tensor.shape[-2] * tensor.shape[0]
        groups = tensor.float().unflatten(-1, (-1, self.q_group_size))
        low, high = groups.amin(-1), groups.amax(-1)
        # Codes are computed against the stored (rounded) scale and zero, and the scale is rounded up a little,
        # so the compute dtype's rounding of them cannot push the top of a group past code 255.
        eps = torch.finfo(tensor.dtype).eps
        scale = ((high - low) / _INT8_LEVELS * (1 + 2 * eps)).clamp(min=torch.finfo(tensor.dtype).tiny)
        scale, zero = scale.to(tensor.dtype), low.to(tensor.dtype)
        codes = ((groups - zero.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, _INT8_LEVELS)
        return codes.to(torch.uint8).flatten(-2), scale, zero

    def _dequantize(self, qtensor):
        codes, scale, zero = qtensor
        groups = codes.unflatten(-1, (-1, self.q_group_size)).float()
        return (groups * scale.float()[..., None] + zero.float()[..., None]).flatten(-2).to(scale.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._quantized_keys = self._quantize(key_states)
            self._quantized_values = self._quantize(value_states)
            return key_states, value_states
        keys = torch.cat([self._dequantize(self._quantized_keys), self.keys, key_states], dim=-2)
        values = torch.cat([self._dequantize(self._quantized_values), self.values, value_states], dim=-2)
        window_keys = torch.cat([self.keys, key_states], dim=-2)
        window_values = torch.cat([self.values, value_states], dim=-2)
        if window_keys.shape[-2] >= self.residual_length:
            self._quantized_keys = _append(self._quantized_keys, self._quantize(window_keys))
            self._quantized_values = _append(self._quantized_values, self._quantize(window_values))
            # Fresh empty tensors, not [..., :0, :] views that would pin the window's storage.
            self.keys = torch.tensor([], dtype=self.dtype, device=self.device)
            self.values = torch.tensor([], dtype=self.dtype, device=self.device)
        else:
            self.keys, self.values = window_keys, window_values
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Groups lie within one row, so codes reorder as they are: no lossy round trip to defer.
        if self.is_initialized:
            self._quantized_keys = _select(self._quantized_keys, beam_idx)
            self._quantized_values = _select(self._quantized_values, beam_idx)
            assert self.keys is not None and self.values is not None
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))


def _append(stored: tuple, new: tuple) -> tuple:
    """Quantized parts concatenated along the token axis (-2 for codes and per-token scales alike)."""
    return tuple(torch.cat([old, part], dim=-2) for old, part in zip(stored, new))


def _select(stored: tuple, beam_idx: torch.LongTensor) -> tuple:
    return tuple(part.index_select(0, beam_idx.to(part.device)) for part in stored)


def make_cache(config: Any, kind: str = "fp", *, residual_length: int = DEFAULT_RESIDUAL_TOKENS,
               device: torch.device | str | None = None) -> Cache | None:
    """A fresh cache for one batch, or None for "fp" (the model then builds its own DynamicCache).

    int8: 8-bit min-max groups along the head dimension, with a full-precision window of `residual_length`
    newest tokens (KIVI), each token quantized once (Int8Layer).
    fp8: float8_e4m3fn codes with a scale per token and head (TokenFp8Layer); no residual window. A storage
    format: attention runs in the compute dtype. Where it may run is capability.fp8_kv_supported(`device`):
    the CPU, and CUDA cards with FP8 (sm_89+); None skips the check.
    Sliding-window layers stay full precision: they are capped at the window, the growth is elsewhere.
    """
    if kind not in KV_KINDS:
        raise ValueError(f"kv cache kind {kind!r} is not one of {', '.join(KV_KINDS)}; use fp for the plain cache")
    if kind == "fp":
        return None
    if residual_length < 1:
        raise ValueError(f"residual_length must be >= 1 token, got {residual_length}")
    if kind == "fp8" and device is not None:
        ok, why = capability.fp8_kv_supported(device)
        if not ok:
            raise ValueError(f"kv cache fp8 cannot run on {device}: {why}")
    text = config.get_text_config(decoder=True)
    layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # Groups of consecutive channels of one token and head: independent of batch and padding, appendable, and
    # gcd() keeps every head's size a multiple of the group.
    group = math.gcd(_MAX_GROUP, head_dim)
    layers: list[Any] = []
    for layer_type, kwargs in zip(layer_types, per_layer_kwargs):
        if layer_type == "full_attention":
            layers.append(Int8Layer(group, residual_length) if kind == "int8" else TokenFp8Layer())
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
