"""The engine's one mapping from the spec's dtype names (jobs.contract.spec.DTYPE_NAMES) to torch dtypes."""
from __future__ import annotations

import torch

from jobs.contract.spec import DTYPE_NAMES

TORCH_DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))  # DTYPE_NAMES' order


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a spec name ("fp32", "bf16", "fp16"); a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    return TORCH_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The spec name of a compute dtype (what stats and error messages say)."""
    return {d: n for n, d in TORCH_DTYPES.items()}.get(dtype, str(dtype))


# Rows converted per step by to_device_as: the only temporary of a conversion on the device.
CONVERT_CHUNK_BYTES = 64 << 20


def to_device_as(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, *, non_blocking: bool = False,
                 chunk_bytes: int = CONVERT_CHUNK_BYTES) -> torch.Tensor:
    """`tensor` on `device`, a floating one in `dtype`: one destination allocated at its final size, filled
    a chunk of rows at a time, so a conversion on the card holds one chunk in the source dtype beside it,
    never a whole second copy (a 27B's 2.63 GiB bf16 embedding copied whole, then converted, peaked at
    5.3 GiB: #29). Other tensors are moved as they are."""
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor.to(device, non_blocking=non_blocking)
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        return out.copy_(tensor, non_blocking=non_blocking)
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, tensor.shape[0], rows):
        out[start:start + rows].copy_(tensor[start:start + rows], non_blocking=non_blocking)
    return out
