"""Optional fused CUDA kernels: Liger's RMSNorm, RoPE and SwiGLU/GeGLU patched into a loaded model instance.

Owns the decision (auto / liger / torch), the reason reported in stats, and keeping Liger's patches local.
Liger needs `pip install liger-kernel` (it pulls triton) and a CUDA device; it is never used on CPU.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from typing import Any

import torch

from jobs.errors import KernelError
from jobs.spec import KERNEL_CHOICES

logger = logging.getLogger(__name__)

# model_type -> (Liger's patch function, the name of its MLP switch in that function)
_LIGER_PATCHES = {
    "gemma3_text": ("apply_liger_kernel_to_gemma3_text", "geglu"),
    "llama": ("apply_liger_kernel_to_llama", "swiglu"),
    "mistral": ("apply_liger_kernel_to_mistral", "swiglu"),
    "mixtral": ("apply_liger_kernel_to_mixtral", "swiglu"),
    "qwen2": ("apply_liger_kernel_to_qwen2", "swiglu"),
}
_ROPE = "apply_rotary_pos_emb"


def apply_kernels(model: Any, device: torch.device | str, choice: str = "auto") -> dict[str, str]:
    """Patch `model` in place with Liger's kernels when they can run; returns {"kernels", "kernels_reason"}.

    auto: Liger on CUDA when liger-kernel is installed and knows the model type, else torch with the reason.
    liger: the same, but a KernelError when it cannot apply. torch: never patch.
    """
    if choice not in KERNEL_CHOICES:
        raise KernelError(f"kernels {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if choice == "torch":
        return {"kernels": "torch", "kernels_reason": "asked for torch"}
    reason = _why_not_liger(model, torch.device(device))
    if reason is not None:
        if choice == "liger":
            raise KernelError(f"kernels 'liger' cannot apply: {reason}; use kernels 'auto' or 'torch' "
                              "(Liger needs a CUDA device and `pip install liger-kernel`)")
        logger.info("Liger kernels off: %s", reason)
        return {"kernels": "torch", "kernels_reason": reason}
    _patch_instance(model)
    version = importlib.metadata.version("liger-kernel")
    return {"kernels": "liger", "kernels_reason": f"cuda, liger-kernel {version}"}


def _why_not_liger(model: Any, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "cpu" if device.type == "cpu" else f"device {device.type}"
    model_type = model.config.model_type
    if model_type not in _LIGER_PATCHES:
        return f"no Liger patch for model type {model_type!r}"
    try:
        importlib.import_module("liger_kernel.transformers")
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc.msg})"
    return None


def _patch_instance(model: Any) -> None:
    """Liger's instance patching, minus what would leak into other models in this process.

    Instance patching binds LigerRMSNorm.forward / Liger*MLP.forward onto the existing modules. Those
    forwards read `self.weight` / `self.gate_proj` at call time (checked in liger-kernel 0.8.5,
    transformers/rms_norm.py and geglu.py / swiglu.py), so the layer streamer's per-pass swap of
    `module._parameters["weight"]` keeps working. Liger also rebinds classes in transformers' modeling
    module, which would make any model built later use Triton, on CPU too: those are put back.
    RoPE is a module-level function there, so it stays patched, behind a dispatcher that sends CPU
    tensors to transformers' own version. Fused linear cross entropy is training-only and stays off.
    """
    import liger_kernel.transformers as liger

    patch_name, mlp_switch = _LIGER_PATCHES[model.config.model_type]
    modeling = sys.modules[type(model).__module__]
    before = dict(vars(modeling))
    # Mixtral's experts are the pager's PagedExperts (moe.py): Liger's expert forward would replace them.
    mlp = model.config.model_type != "mixtral"
    getattr(liger, patch_name)(model=model, rope=True, rms_norm=True, cross_entropy=False,
                               fused_linear_cross_entropy=False, **{mlp_switch: mlp})
    for name, value in list(vars(modeling).items()):
        if name in before and before[name] is not value:
            if name == _ROPE:
                setattr(modeling, name, _rope_dispatch(getattr(before[name], "torch_rope", before[name]), value))
            else:
                setattr(modeling, name, before[name])


def _rope_dispatch(torch_rope, liger_rope):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        rope = liger_rope if q.is_cuda else torch_rope
        return rope(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.torch_rope = torch_rope
    return apply_rotary_pos_emb
