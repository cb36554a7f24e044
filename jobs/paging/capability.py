"""What the compute device can do, decided in one place: native bf16, FP8, Triton's bf16 kernels, and
the compute dtype that `dtype = "auto"` resolves to (and the cuBLAS reduction setting that goes with fp16).
Tests monkeypatch `device_capability`.
"""
from __future__ import annotations

import torch

from jobs.contract.errors import SettingError
from jobs.paging.plan.profiles import NATIVE_BF16_FROM, dtype_for

# CUDA compute capability from which a feature runs natively (Ampere: bf16 tensor cores and Triton's
# bf16 kernels; Ada/Hopper: FP8). A Turing card (RTX 2080 Ti, sm_75) has none of them.
TRITON_BF16_FROM = (8, 0)
FLASH_SDPA_FROM = (8, 0)  # torch's flash attention kernels: Ampere and later
FP8_FROM = (8, 9)


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for the CPU and other non-CUDA devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def native_bf16(device: torch.device | str) -> bool:
    cap = device_capability(device)
    return cap is not None and cap >= NATIVE_BF16_FROM


def fp8_supported(device: torch.device | str) -> bool:
    cap = device_capability(device)
    return cap is not None and cap >= FP8_FROM


def triton_supports(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether Triton kernels (Liger) can run here in `dtype`, and the reason when not."""
    cap = device_capability(device)
    if cap is None:
        return False, f"device {torch.device(device).type} (Triton kernels need CUDA)"
    if dtype == torch.bfloat16 and cap < TRITON_BF16_FROM:
        return False, (f"sm_{cap[0]}{cap[1]} has no bf16 in Triton (needs sm_"
                       f"{TRITON_BF16_FROM[0]}{TRITON_BF16_FROM[1]}+); use dtype fp16 or kernels torch")
    return True, f"sm_{cap[0]}{cap[1]}"


def resolve_dtype(requested: str, device: torch.device | str) -> str:
    """The compute dtype name for `requested` ("auto", "fp32", "bf16", "fp16") on `device`:
    auto is fp32 on the CPU, bf16 where the card has it natively, fp16 on older CUDA cards.

    An explicit bf16 on a card without native bf16 (Turing, sm_75) is refused: torch would run it
    emulated, slower than fp16 and without a word. fp16 on CUDA turns off cuBLAS's fp16 reduction of
    split-K partial sums (torch allows it by default): a long dot product then rounds its partials in fp32."""
    cap = device_capability(device)
    if requested == "bf16" and cap is not None and cap < NATIVE_BF16_FROM:
        raise SettingError(f"dtype \"bf16\" on sm_{cap[0]}{cap[1]} runs emulated (native bf16 needs sm_"
                           f"{NATIVE_BF16_FROM[0]}{NATIVE_BF16_FROM[1]}+): set dtype = \"auto\" or \"fp16\" "
                           "(or \"fp32\") in the model's table or on the command line")
    name = dtype_for(requested, cap)
    if name == "fp16" and cap is not None:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    return name


def sdpa_backends(device: torch.device | str) -> str:
    """The SDPA backends torch has enabled for `device`, in its order of preference ("cpu" off CUDA:
    one CPU kernel, no choice). Enabled is not chosen: flash needs sm_80+ (left out below it, where torch
    cannot pick it) and fp16/bf16 inputs."""
    if torch.device(device).type != "cuda":
        return "cpu"
    try:
        cap = device_capability(device)
    except (AssertionError, RuntimeError):  # a torch without CUDA: the flags alone
        cap = None
    cuda = torch.backends.cuda
    flash = cuda.flash_sdp_enabled() and (cap is None or cap >= FLASH_SDPA_FROM)
    enabled = {"flash": flash, "efficient": cuda.mem_efficient_sdp_enabled(),
               "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: False)(), "math": cuda.math_sdp_enabled()}
    return ",".join(name for name, on in enabled.items() if on) or "none"


def attention_report(model, device: torch.device | str) -> dict[str, str]:
    """What runs attention, for a run's metrics: transformers' implementation and torch's SDPA backends."""
    return {"attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
            "sdpa_backends": sdpa_backends(device)}


def fp8_kv_supported(device: torch.device | str) -> tuple[bool, str]:
    """Whether the FP8 KV cache may run here, and why. It is a storage format (codes in float8_e4m3fn,
    dequantized to the compute dtype before attention): on the CPU torch's casts make it work everywhere,
    so it is offered for the memory it saves; on CUDA only where the card has FP8 (sm_89+), elsewhere int8."""
    cap = device_capability(device)
    if cap is None:
        return True, f"{torch.device(device).type}: fp8 as storage, attention in the compute dtype"
    if fp8_supported(device):
        return True, f"sm_{cap[0]}{cap[1]} has FP8"
    return False, (f"sm_{cap[0]}{cap[1]} has no FP8 (needs sm_{FP8_FROM[0]}{FP8_FROM[1]}+); "
                   "use kv_cache int8 or fp")
