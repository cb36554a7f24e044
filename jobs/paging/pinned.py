"""Host memory the device copies from: exact-size page-locked arenas, and what torch's own pinned
allocator really takes for a request.

torch's CachingHostAllocator rounds every pinned block up to a power of two (torch 2.4 .. 2.13 by
default), so pinning a Mixtral expert of 336 MiB takes 512 MiB and 256 of them take 128 GiB. An arena
is one ordinary host buffer of exactly the bytes asked for, page-locked in place with cudaHostRegister,
and carved into views: what the plan counts is what the host gives.
Owns the arena's life: registration (a refusal clears CUDA's last error and leaves a pageable arena, with the
reason), and unregistration after every copy on the device has finished, by close() or by a finalizer.
"""
from __future__ import annotations

import ctypes
import logging
import os
import weakref

import torch

from jobs.contract.units import format_size  # can view it, copies stay aligned
from jobs.paging.plan.expert_budget import aligned  # every view starts on a 64-byte boundary: any dtype

log = logging.getLogger(__name__)
_CUDART_SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


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
        self.pin_reason = "not asked (cpu)" if not pin else "empty"  # why pinned_bytes is 0, or "pinned"
        self._offset = 0
        # Unregisters an arena dropped without close(); holds the buffer so the pages outlive the registration.
        self._finalizer: weakref.finalize | None = None
        if pin and self.nbytes:
            self._register()

    def _register(self) -> None:
        cudart = torch.cuda.cudart()
        result = cudart.cudaHostRegister(self.buffer.data_ptr(), self.nbytes, 0)
        try:
            torch.cuda.check_error(result)
        except torch.cuda.CudaError as exc:
            # The failed call left CUDA's (per-thread) last error set: the next kernel launch would raise it
            # as its own. Clear it; the arena stays pageable (copies from it do not overlap compute).
            cleared = clear_last_cuda_error(cudart)
            self.pin_reason = (f"{pinned_error(self.what, self.nbytes, f'cudaHostRegister: {exc}')}; pageable "
                               f"memory instead, copies from it do not overlap compute"
                               + ("" if cleared else " (CUDA's last error could not be cleared)"))
            log.warning("%s", self.pin_reason)
            return
        self.pinned_bytes = self.nbytes
        self.pin_reason = "pinned"
        self._finalizer = weakref.finalize(self, _unregister, self.buffer, self.what)
        self._finalizer.atexit = False  # at exit the driver drops every registration itself

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
        """Unregister (after the device has finished every copy: one may still read or write the pages on a
        side stream) and drop the buffer; views taken before are the caller's to drop."""
        if self._finalizer is not None:
            self._finalizer()  # runs _unregister once
            self._finalizer = None
        self.pinned_bytes = 0
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._offset = 0


def _unregister(buffer: torch.Tensor, what: str) -> None:
    """Wait for every stream of the device, then unregister: freeing or unpinning pages an async copy still
    uses is undefined behaviour, not an error CUDA reports."""
    torch.cuda.synchronize()
    result = torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    if result != 0:
        clear_last_cuda_error(torch.cuda.cudart())
        log.warning("%s: cudaHostUnregister returned %s", what, result)


def clear_last_cuda_error(cudart: object) -> bool:
    """Reset CUDA's last error (cudaGetLastError) after a runtime call that failed outside torch's checks;
    torch's cudart bindings lack it, so it is called in the libcudart torch has already loaded. False when
    neither is there."""
    get_last = getattr(cudart, "cudaGetLastError", None)
    if get_last is not None:
        get_last()
        return True
    for soname in _CUDART_SONAMES:
        try:
            lib = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # only one already loaded
        except OSError:
            continue
        lib.cudaGetLastError()
        return True
    return False
