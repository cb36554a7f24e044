"""Teardown on CUDA, shown on the CPU with a fake cudart and the thread engine recording the order of calls:
the device is waited for before pinned pages are unregistered or slots freed, a refused cudaHostRegister
clears CUDA's last error and leaves a pageable arena with its reason, and a dropped arena is unregistered."""
from __future__ import annotations

import gc

import pytest
import torch

from jobs.paging.copy_engine import ThreadEngine
from jobs.paging.dense.slots import SlotRing
from jobs.paging.pinned import HostArena

pytestmark = pytest.mark.engine


class FakeCudart:
    """The three cudart calls the arena makes, recorded into `calls`; `register_result` 2 is
    cudaErrorMemoryAllocation (what a low `ulimit -l` gives)."""

    def __init__(self, calls: list, register_result: int = 0) -> None:
        self.calls, self.register_result = calls, register_result

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr, nbytes))
        return self.register_result

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0

    def cudaGetLastError(self):
        self.calls.append(("get_last_error",))
        return 0


class Calls(list):
    cudart: FakeCudart


@pytest.fixture
def calls(monkeypatch) -> Calls:
    recorded = Calls()
    cudart = FakeCudart(recorded)

    def check_error(code):
        if code:
            exc = torch.cuda.CudaError.__new__(torch.cuda.CudaError)
            RuntimeError.__init__(exc, f"out of memory ({code})")
            raise exc

    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: recorded.append(("synchronize",)))
    recorded.cudart = cudart
    return recorded


def test_close_waits_for_the_device_before_unregistering(calls):
    arena = HostArena(4096, pin=True, what="RAM cache")
    ptr = arena.buffer.data_ptr()
    assert arena.pinned_bytes == 4096 and arena.pin_reason == "pinned"
    arena.close()
    assert calls == [("register", ptr, 4096), ("synchronize",), ("unregister", ptr)]
    assert arena.pinned_bytes == 0
    arena.close()  # twice: nothing more
    assert len(calls) == 3


def test_an_arena_dropped_without_close_is_unregistered(calls):
    arena = HostArena(4096, pin=True)
    ptr = arena.buffer.data_ptr()
    del arena
    gc.collect()
    assert calls == [("register", ptr, 4096), ("synchronize",), ("unregister", ptr)]


def test_a_refused_register_clears_the_last_error_and_stays_pageable(calls):
    calls.cudart.register_result = 2
    arena = HostArena(4096, pin=True, what="expert store")
    assert calls[0][0] == "register" and calls[1:] == [("get_last_error",)]
    assert arena.pinned_bytes == 0
    assert "expert store" in arena.pin_reason and "cudaHostRegister" in arena.pin_reason
    assert "4096 bytes" in arena.pin_reason and "pageable memory instead" in arena.pin_reason
    assert arena.take(100).numel() == 100  # still an arena
    arena.close()
    del arena
    gc.collect()
    assert [c[0] for c in calls] == ["register", "get_last_error"]  # nothing registered: nothing to undo


class LoggingEngine(ThreadEngine):
    """The thread engine, logging whether the ring's slots still exist each time the host waits for an event."""

    def __init__(self, ring_of: dict) -> None:
        super().__init__()
        self.ring_of, self.log = ring_of, []

    def host_wait(self, event, why: str) -> None:
        self.log.append((why, len(self.ring_of["ring"].device_buffers)))
        super().host_wait(event, why)


def test_the_slot_ring_waits_for_its_copies_before_freeing_the_slots():
    """A copy into slot 0 still in flight on the side stream at close(): its event is waited for while
    the slots still exist, and only then are they dropped (the checker would also refuse the free)."""
    ring_of: dict = {}
    engine = LoggingEngine(ring_of)
    ring = SlotRing(2, 256, torch.device("cpu"), engine=engine)
    ring_of["ring"] = ring
    side = engine.new_stream()
    slot = ring.acquire()
    ring.before_copy_in(slot, side)
    engine.run(side, lambda: ring.device_buffers[slot].fill_(1), writes=[("slot", slot)])
    ring.after_copy_in(slot, side)   # the copy's "ready" event, not yet waited for
    ring.release(slot, stream=engine.compute_stream())
    ring.close()
    engine.close()
    assert engine.log == [("slot ring close", 2), ("slot ring close", 2)]  # the copy-in and the last reader
    assert ring.device_buffers == [] and engine.violations == []
