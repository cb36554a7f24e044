"""Host memory the device copies from: exact-size page-locked arenas, and what torch's own pinned
allocator really takes for a request.

torch's CachingHostAllocator rounds every pinned block up to a power of two (torch 2.4 .. 2.13 by
default), so pinning a Mixtral expert of 336 MiB takes 512 MiB and 256 of them take 128 GiB. An arena
is one ordinary host buffer of exactly the bytes asked for, page-locked in place with cudaHostRegister,
and carved into views: what the plan counts is what the host gives.
"""
from __future__ import annotations

import torch

from jobs.contract.units import format_size  # can view it, copies stay aligned
from jobs.paging.plan.expert_budget import aligned  # every view starts on a 64-byte boundary: any dtype


def pinned_alloc_bytes(nbytes: int) -> int:
    """Bytes `torch.empty(nbytes, pin_memory=True)` really pins: the next power of two."""
    return 1 << max(0, int(nbytes) - 1).bit_length() if nbytes > 0 else 0


class PinnedHostError(MemoryError):
    """Page-locking host memory failed; oom.oom_kind reads "pinned memory ... out of memory" as pinned_host."""


def pinned_error(what: str, nbytes: int, cause: str) -> PinnedHostError:
    """The failure as jobs.contract.oom reads it: kind pinned_host, requested_bytes from "you tried to allocate N bytes"."""
    return PinnedHostError(
        f"{what}: pinned memory out of memory, you tried to allocate {nbytes} bytes ({format_size(nbytes)}) "
        f"of page-locked host memory ({cause}); lower ram_budget_bytes in the model's table, or raise the "
        "locked-memory limit (ulimit -l / LimitMEMLOCK=)")


class HostArena:
    """One flat uint8 host buffer of exactly `nbytes`, page-locked when `pin` (CUDA), handed out as views.

    On a CPU-only run nothing is pinned and `pinned_bytes` is 0; the carving and the byte counts are
    the same, which is what the CPU tests check.
    """

    def __init__(self, nbytes: int, *, pin: bool, what: str = "host arena") -> None:
        self.nbytes = aligned(nbytes)
        self.what = what
        try:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        except RuntimeError as exc:  # DefaultCPUAllocator: can't allocate memory
            raise MemoryError(f"{what}: cannot allocate {self.nbytes} bytes ({format_size(self.nbytes)}) of "
                              f"host memory: {exc}") from None
        self.pinned_bytes = 0
        self._offset = 0
        if pin and self.nbytes:
            self._register()

    def _register(self) -> None:
        cudart = torch.cuda.cudart()
        result = cudart.cudaHostRegister(self.buffer.data_ptr(), self.nbytes, 0)
        try:
            torch.cuda.check_error(result)
        except torch.cuda.CudaError as exc:
            raise pinned_error(self.what, self.nbytes, f"cudaHostRegister: {exc}") from None
        self.pinned_bytes = self.nbytes

    @property
    def free_bytes(self) -> int:
        return self.nbytes - self._offset

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 view of the next `nbytes` (64-byte aligned); MemoryError when the arena is spent."""
        size = aligned(nbytes)
        if size > self.free_bytes:
            raise MemoryError(f"{self.what}: {nbytes} bytes asked, {self.free_bytes} left of {self.nbytes}")
        view = self.buffer[self._offset:self._offset + nbytes]
        self._offset += size
        return view

    def close(self) -> None:
        if self.pinned_bytes:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr()))
            self.pinned_bytes = 0
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._offset = 0
