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
