"""Which worker failures are out-of-memory (jobs/contract/oom.py), with the texts torch and CUDA really use."""
from __future__ import annotations

import sys
import types

import pytest

from jobs.contract.oom import oom_details, oom_kind


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError: the worker matches it by name, without torch."""


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 10.75 GiB "
            "of which 1.12 GiB is free. Of the allocated memory 8.1 GiB is allocated by PyTorch")


@pytest.mark.parametrize("exc, kind", [
    (OutOfMemoryError(CUDA_OOM), "cuda"),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "cuda"),
    (RuntimeError("CUDA error: out of memory (cudaHostAlloc failed while pinning 4 GiB)"), "pinned_host"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "cublas"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "cublas"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate "
                  "memory)"), "host"),
    (MemoryError(), "host"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"), None),
    (ValueError("out of range"), None),
])
def test_oom_kind_recognizes_each_allocation_failure_and_nothing_else(exc, kind):
    assert oom_kind(exc) == kind


def test_requested_bytes_come_from_the_message_and_sizes_from_the_allocator(monkeypatch):
    assert oom_details(OutOfMemoryError(CUDA_OOM))["requested_bytes"] == 2 * 1024**3
    host = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes")
    assert oom_details(host) == {"oom_kind": "host", "requested_bytes": 1024}
    cuda = types.SimpleNamespace(
        is_initialized=lambda: True, mem_get_info=lambda: (1 * 1024**3, 11 * 1024**3),
        memory_stats=lambda: {"reserved_bytes.all.current": 9 * 1024**3,
                              "allocated_bytes.all.current": 8 * 1024**3})
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    details = oom_details(OutOfMemoryError(CUDA_OOM))
    assert details == {"oom_kind": "cuda", "requested_bytes": 2 * 1024**3, "free_bytes": 1024**3,
                       "total_bytes": 11 * 1024**3, "reserved_bytes": 9 * 1024**3,
                       "allocated_bytes": 8 * 1024**3}

    def lost():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(cuda, "mem_get_info", lost)
    assert "illegal memory access" in oom_details(OutOfMemoryError(CUDA_OOM))["allocator_error"]
