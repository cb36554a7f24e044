"""Numerics the engine guards: fp16-safe execution of models whose activations overflow fp16 (Gemma-2/3),
and the device-side non-finite flags that generate() reads with the step's one host sync.

fp16-safe keeps transformers' own layers and only hooks them: the residual stream between and inside decoder
layers stays fp32, every nn.Linear runs its matmul in fp16 on an input scaled by a power of two (exact, undone
in fp32 on the output), so the products that saturate fp16 (gate*up, down_proj, o_proj) never exist in fp16.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jobs.contract.errors import NonFiniteError
from jobs.paging import capability
from jobs.paging.dtypes import dtype_name, torch_dtype
from jobs.paging.plan.profiles import fp16_safe_for

# A Linear's input is scaled down (by a power of two, per token) until its largest magnitude is at most
# 2**INPUT_MAX_EXP. Measured on Gemma-3-270M: the largest fp16 product is then ~530 (q_proj), 120x below
# fp16's 65504, while small entries stay clear of fp16's subnormals (2**4 lost greedy agreement on a prompt).
INPUT_MAX_EXP = 8
# Linears whose output feeds attention (and the KV cache) return the compute dtype; every other one
# returns fp32, because what follows (gelu*up, the post-norms, the residual add) is where fp16 overflows.
_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")


def resolve_numerics(dtype: str | torch.dtype, fp16_safe: str, device: torch.device | str,
                     model_type: str) -> tuple[torch.dtype, bool]:
    """The one resolution of the dtype and fp16-safe settings: (compute dtype, whether the fp16-safe hooks run)."""
    if not isinstance(dtype, torch.dtype):
        dtype = torch_dtype(capability.resolve_dtype(dtype, device))
    return dtype, resolve_fp16_safe(fp16_safe, dtype, model_type)


def resolve_fp16_safe(setting: str, dtype: torch.dtype, model_type: str) -> bool:
    """Whether the fp16-safe path runs (profiles.fp16_safe_for: "auto" in fp16 for models in OVERFLOWS_FP16)."""
    return fp16_safe_for(setting, dtype_name(dtype), model_type)


class Fp16Safe:
    """Hooks on a causal LM's decoder layers, their Linears and lm_head; `remove()` takes them off."""

    def __init__(self, model: Any) -> None:   # a transformers causal LM
        self.compute_dtype = model.get_input_embeddings().weight.dtype
        self._handles: list[Any] = []
        for layer in model.get_decoder().layers:
            self._handles.append(layer.register_forward_pre_hook(_residual_fp32, with_kwargs=True))
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    keep = name.rpartition(".")[2] in _ATTENTION_INPUTS
                    self._hook_linear(module, self.compute_dtype if keep else torch.float32)
        head = model.get_output_embeddings()
        if head is not None:
            self._hook_linear(head, torch.float32)  # the final norm hands it the fp32 residual stream

    def _hook_linear(self, linear: nn.Linear, out_dtype: torch.dtype) -> None:
        scales: list[torch.Tensor] = []  # pre -> post of the same call; forwards do not nest per module

        def pre(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
            # 2**k with k >= 0: dividing is exact, and the matmul is linear, so the output is multiplied back.
            scale = torch.exp2((torch.ceil(torch.log2(amax)) - INPUT_MAX_EXP).clamp(min=0))
            scales.append(scale)
            return ((x.float() / scale).to(module.weight.dtype), *args[1:])

        def post(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return (out.float() * scales.pop()).to(out_dtype)

        self._handles.append(linear.register_forward_pre_hook(pre))
        self._handles.append(linear.register_forward_hook(post))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _residual_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The decoder layer's hidden_states in fp32: its residual adds and norms then run in fp32."""
    if args:
        return (args[0].float(), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].float()}


class NonFiniteWatch:
    """One device flag per decoder layer, set when the layer's output holds inf or NaN; no host sync.

    generate() appends the flags to the step's picked ids and reads both with its one `.tolist()`.
    """

    def __init__(self, model: Any) -> None:   # a transformers causal LM
        layers = model.get_decoder().layers
        embeddings = model.get_input_embeddings().weight
        self.dtype = embeddings.dtype  # the compute dtype, for the error message
        self.flags = torch.zeros(len(layers), dtype=torch.bool, device=embeddings.device)
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self.flags[index] |= ~torch.isfinite(hidden).all()
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def non_finite_error(layer_flags: list[int], step: int, dtype: torch.dtype, fp16_safe: bool) -> NonFiniteError:
    """The error for a step whose flags are set: names the first decoder layer that went non-finite
    (else the logits), the dtype, and the setting to change."""
    bad = [i for i, flag in enumerate(layer_flags) if flag]
    where = f"the output of decoder layer {bad[0]}" if bad else "the logits"
    name = dtype_name(dtype)
    if name == "fp16" and not fp16_safe:
        fix = 'set fp16_safe = "on" or dtype = "fp32" in [models.NAME] (generate: --fp16-safe on or --dtype fp32)'
    else:
        fix = 'set dtype = "fp32" in [models.NAME] (generate: --dtype fp32)'
    safe = " with the fp16-safe path on" if fp16_safe else ""
    return NonFiniteError(f"non-finite values (inf/NaN) in {where} at generation step {step}, computing in "
                          f"{name}{safe}: the model overflows {name}; {fix}")
