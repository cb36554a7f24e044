"""What counts as running out of memory in a worker, and the numbers that go with it (stdlib only).

CUDA OOM, a failed pinned-host allocation, cuBLAS/cuDNN workspace failures and host allocation
failures all end a run `oom`. Sizes come from the allocator's own APIs (torch.cuda.mem_get_info,
memory_stats) when torch is loaded and CUDA is up; only the requested size is read from the message.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from jobs.contract.units import parse_size

# (kind, pattern in str(exc)); the first match names the kind. torch wraps most of these in a
# RuntimeError (or torch.AcceleratorError) whose text is all we can see without importing torch.
_PATTERNS = (
    ("pinned_host", re.compile(r"cudaHostAlloc|pin(ned)?[ _]memory.*out of memory|"
                               r"CachingHostAllocator", re.I | re.S)),
    ("cublas", re.compile(r"CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED")),
    ("cuda", re.compile(r"CUDA out of memory|CUDA error: out of memory|cudaErrorMemoryAllocation",
                        re.I)),
    ("host", re.compile(r"DefaultCPUAllocator: can't allocate memory|Cannot allocate memory")),
)
_REQUESTED = re.compile(r"Tried to allocate ([0-9.]+ ?[KMGT]i?B)|you tried to allocate ([0-9]+) bytes")


def oom_kind(exc: BaseException) -> str | None:
    """"cuda", "pinned_host", "cublas", "host" for an out-of-memory failure; None for anything else."""
    if type(exc).__name__ == "OutOfMemoryError":     # torch.OutOfMemoryError, without torch here
        return next((kind for kind, rx in _PATTERNS[:2] if rx.search(str(exc))), "cuda")
    text = str(exc)
    for kind, rx in _PATTERNS:
        if rx.search(text):
            return kind
    return "host" if isinstance(exc, MemoryError) else None


def oom_details(exc: BaseException) -> dict[str, Any]:
    """kind, requested_bytes (from the message) and, when CUDA is up, free/total/reserved/allocated
    bytes of the current device from the allocator."""
    out: dict[str, Any] = {"oom_kind": oom_kind(exc)}
    m = _REQUESTED.search(str(exc))
    if m:
        out["requested_bytes"] = parse_size((m.group(1) or m.group(2)).replace(" ", ""))
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return out
    try:
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
    except Exception as exc2:  # noqa: BLE001 - a sticky CUDA error: report what the message had
        out["allocator_error"] = f"{type(exc2).__name__}: {exc2}"[:300]
        return out
    out.update(free_bytes=int(free), total_bytes=int(total),
               reserved_bytes=int(stats.get("reserved_bytes.all.current", 0)),
               allocated_bytes=int(stats.get("allocated_bytes.all.current", 0)))
    return out
