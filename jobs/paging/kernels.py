"""Optional fused CUDA kernels: Liger's RMSNorm, RoPE and SwiGLU/GeGLU patched into a loaded model instance.

Owns the decision (auto / liger / torch) and its reason in stats, the load-time warm-up that falls back to torch
kernels, keeping Liger's patches local, and reporting what runs attention. Liger needs `pip install liger-kernel`
(it pulls triton) and a CUDA device whose Triton can build its kernels in the model's dtype (capability.py).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from typing import Any, Callable

import torch

from jobs.contract.errors import KernelError
from jobs.contract.spec import KERNEL_CHOICES
from jobs.paging import capability
from jobs.paging.dtypes import dtype_name

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
    """Patch `model` in place with Liger's kernels when they can run; returns {"kernels", "kernels_reason"} and
    what runs attention ({"attn_implementation", "sdpa_backends"}, capability.attention_report).

    auto: Liger where `why_not_liger` finds nothing against it and a warm-up of its kernels on the device in the
    model's dtype succeeds, else torch with the reason. liger: the same, but a KernelError when it cannot apply.
    torch: never patch.
    """
    if choice not in KERNEL_CHOICES:
        raise KernelError(f"kernels {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    device = torch.device(device)
    report = capability.attention_report(model, device)
    if choice == "torch":
        return {"kernels": "torch", "kernels_reason": "asked for torch", **report}
    dtype = compute_dtype(model)
    reason = why_not_liger(model.config.model_type, device, dtype)
    if reason is None:
        reason = _patch_and_warm_up(model, device, dtype)
    if reason is not None:
        if choice == "liger":
            raise KernelError(f"kernels 'liger' cannot apply: {reason}; use kernels 'auto' or 'torch' "
                              "(Liger needs a CUDA device and `pip install liger-kernel`)")
        logger.info("Liger kernels off: %s", reason)
        return {"kernels": "torch", "kernels_reason": reason, **report}
    version = importlib.metadata.version("liger-kernel")
    arch = capability.triton_supports(device, dtype)[1]
    return {"kernels": "liger", "kernels_reason": f"{arch} {dtype_name(dtype)}, liger-kernel {version}", **report}


def why_not_liger(model_type: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why Liger cannot run `model_type` on `device` in `dtype`, or None. Pure but for capability's
    device query (tests monkeypatch capability.device_capability) and the liger-kernel import."""
    if device.type != "cuda":
        return "cpu" if device.type == "cpu" else f"device {device.type}"
    ok, why = capability.triton_supports(device, dtype)
    if not ok:
        return why
    if model_type not in _LIGER_PATCHES:
        return f"no Liger patch for model type {model_type!r}"
    try:
        importlib.import_module("liger_kernel.transformers")
    except ImportError as exc:
        return f"liger-kernel is not installed ({exc.msg})"
    return None


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the model computes in: config.dtype when set to a torch dtype, else its first float weight's."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _patch_and_warm_up(model: Any, device: torch.device, dtype: torch.dtype) -> str | None:
    """Patch, then run each patched kernel once: None when they ran, else the reason (and the patch undone).

    Triton compiles a kernel at its first launch for the device and dtype, so an arch or dtype it cannot build
    for fails here, at load, instead of at the run's first forward. The warm-up uses fresh tiny inputs, not the
    model's weights: the layer streamer patches a model whose weights are still on the meta device."""
    undo = _snapshot(model)
    _patch_instance(model)
    try:
        _warm_up(model.config.model_type, device, dtype)
    except Exception as exc:  # Triton's compile and launch errors share no base class worth naming
        undo()
        logger.warning("Liger warm-up failed on %s in %s, torch kernels instead", device, dtype_name(dtype),
                       exc_info=True)
        return f"Liger warm-up failed on {device} in {dtype_name(dtype)}: {type(exc).__name__}: {exc}"
    return None


def _warm_up(model_type: str, device: torch.device, dtype: torch.dtype) -> None:
    """One call of each kernel the patch binds (RMSNorm, RoPE, the gated MLP), synchronized so a failed
    launch raises here."""
    from liger_kernel.transformers import LigerRMSNorm, liger_rotary_pos_emb

    hidden, heads, seq = 64, 2, 4
    x = torch.randn(1, seq, hidden, device=device, dtype=dtype)
    LigerRMSNorm(hidden).to(device, dtype)(x)
    q, k = torch.randn(2, 1, heads, seq, hidden, device=device, dtype=dtype)
    cos, sin = torch.randn(2, 1, seq, hidden, device=device, dtype=dtype)
    liger_rotary_pos_emb(q, k, cos, sin)
    if model_type != "mixtral":  # Mixtral's experts are the pager's: Liger's MLP is not patched in
        if _LIGER_PATCHES[model_type][1] == "geglu":
            from liger_kernel.ops.geglu import LigerGELUMulFunction as GatedMul
        else:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as GatedMul
        GatedMul.apply(x, x.clone())
    torch.cuda.synchronize(device)


def _snapshot(model: Any) -> Callable[[], None]:
    """An undo for `_patch_instance`: every module's instance attributes and its modeling module's globals as
    they are now. Liger binds forwards onto instances and rebinds module-level functions; restoring both
    leaves transformers' own code running, without depending on which attributes a Liger version sets."""
    modeling = sys.modules[type(model).__module__]
    module_globals = dict(vars(modeling))
    instances = [(m, dict(vars(m))) for m in model.modules()]

    def undo() -> None:
        for name, value in list(vars(modeling).items()):
            if name in module_globals and module_globals[name] is not value:
                setattr(modeling, name, module_globals[name])
        for module, before in instances:
            now = vars(module)  # the instance dict itself: nn.Module.__setattr__ would re-register things
            for name in set(now) - set(before):
                del now[name]
            now.update((name, value) for name, value in before.items() if now.get(name) is not value)

    return undo


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
