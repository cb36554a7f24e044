"""Teardown on CUDA, shown on the CPU with a fake cudart and fake events that record the order of calls:
the device is waited for before pinned pages are unregistered or slots freed, a refused cudaHostRegister
clears CUDA's last error and leaves a pageable arena with its reason, and a dropped arena is unregistered."""
from __future__ import annotations

import gc

import pytest
import torch

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


class FakeEvent:
    """A CUDA event's host side: synchronize() logs whether the ring's slots still exist at that moment."""

    def __init__(self, log: list, ring_of: dict) -> None:
        self.log, self.ring_of = log, ring_of

    def record(self, stream) -> None:
        self.log.append(("record", stream))

    def synchronize(self) -> None:
        self.log.append(("synchronize", len(self.ring_of["ring"].device_buffers)))


class FakeStream:
    def __init__(self, log: list) -> None:
        self.log = log

    def wait_event(self, event) -> None:
        self.log.append(("wait_event",))


def test_the_slot_ring_waits_for_its_copies_before_freeing_the_slots():
    """A copy into slot 0 still in flight on the side stream at close(): its event is synchronized while
    the slots still exist, and only then are they dropped."""
    log: list = []
    ring_of: dict = {}
    ring = SlotRing(2, 256, torch.device("cpu"), make_event=lambda: FakeEvent(log, ring_of))
    ring_of["ring"] = ring
    side = FakeStream(log)
    slot = ring.acquire()
    ring.before_copy_in(slot, side)
    ring.after_copy_in(slot, side)   # the copy's "ready" event, not yet waited for
    ring.release(slot, stream="compute")
    ring.close()
    synced = [entry for entry in log if entry[0] == "synchronize"]
    assert synced == [("synchronize", 2), ("synchronize", 2)]  # the copy-in and the last reader, slots alive
    assert ring.device_buffers == []
