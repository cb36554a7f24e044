"""Streaming slots that exist in memory, not only in a counter: a fixed ring of layer-sized buffers.

A streamed layer may be copied only into a free slot. On CUDA each slot is one flat device buffer
allocated once, plus one pinned host staging buffer of the same size in an exact arena
(pinned.HostArena); the side stream waits on the slot's "free" event, recorded on the compute stream
after the last kernel that read it, before it copies in, and the host waits on the slot's "copied"
event before it overwrites the staging buffer. Peak device memory for streaming is then the plan's
`slots x layer bytes` by construction, however far ahead the host could run. On CPU the slots hold no
buffers (a layer computes where it was read) but the ring bounds how many layers are alive the same way.
Streams and events go through a copy engine (jobs.paging.copy_engine): CUDA's, or on CPU the checked thread engine,
which gives the ring real buffers and staging as on CUDA.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from jobs.paging.copy_engine import CopyEngine
from jobs.paging.pinned import HostArena, aligned


@dataclass(frozen=True)
class Part:
    name: str
    offset: int           # bytes into the slot
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def layout(tensors: dict[str, tuple[torch.Size, torch.dtype]]) -> tuple[list[Part], int]:
    """Where each tensor of a layer sits in a slot (64-byte aligned), and the slot bytes it needs."""
    parts, offset = [], 0
    for name, (shape, dtype) in tensors.items():
        parts.append(Part(name, offset, torch.Size(shape), dtype))
        offset += aligned(torch.Size(shape).numel() * dtype.itemsize)
    return parts, offset


def views(flat: torch.Tensor, parts: list[Part]) -> dict[str, torch.Tensor]:
    """Typed views of a flat uint8 buffer (device slot or host staging) for one layer's parts."""
    return {p.name: flat[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in parts}


class SlotRing:
    """`count` slots of `slot_bytes`; acquire() blocks while all are taken, release() frees one after the
    compute that reads it. `max_in_use` records the most slots ever held at once (what tests check)."""

    def __init__(self, count: int, slot_bytes: int, device: torch.device, *, staging_bytes: int | None = None,
                 engine: CopyEngine | None = None, pin: bool | None = None) -> None:
        self.count, self.slot_bytes, self.device = count, aligned(slot_bytes), device
        staging_bytes = self.slot_bytes if staging_bytes is None else aligned(staging_bytes)
        cuda = device.type == "cuda"
        self.engine = engine  # None: cpu without one, copies are plain and nothing is staged
        self._cond = threading.Condition()
        self._free: deque[int] = deque(range(count))
        self.in_use = 0
        self.max_in_use = 0
        self._freed: dict[int, Any] = {}    # slot -> event on the compute stream after its last reader
        self._copied: dict[int, Any] = {}   # slot -> event on the side stream after its last copy in
        # One allocation each, up front: the plan's numbers are what exists.
        self.device_buffers = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self.staging = HostArena(count * staging_bytes, pin=cuda if pin is None else pin,
                                 what="streaming staging ring") if engine is not None else None
        self.staging_buffers = [self.staging.take(staging_bytes) for _ in range(count)] if self.staging else []

    @property
    def device_bytes(self) -> int:
        return sum(b.numel() for b in self.device_buffers)

    @property
    def pinned_bytes(self) -> int:
        return self.staging.pinned_bytes if self.staging else 0

    def acquire(self) -> int:
        with self._cond:
            while not self._free:
                self._cond.wait()
            slot = self._free.popleft()
            self.in_use += 1
            self.max_in_use = max(self.max_in_use, self.in_use)
            return slot

    def release(self, slot: int, stream: Any = None) -> None:
        """Free `slot` once the work queued so far on `stream` (the compute stream) has run."""
        if self.engine is not None and stream is not None:
            self._freed[slot] = self.engine.record(stream)
        with self._cond:
            self._free.append(slot)
            self.in_use -= 1
            self._cond.notify()

    def before_copy_in(self, slot: int, side_stream: Any) -> None:
        """On the side stream: wait for the last reader of `slot`; on the host: wait until the staging
        buffer's previous copy has left it."""
        engine = self._engine()
        copied = self._copied.pop(slot, None)
        if copied is not None:
            engine.host_wait(copied, "staging copied")
        freed = self._freed.pop(slot, None)
        if freed is not None:
            engine.wait(side_stream, freed, "slot freed")

    def after_copy_in(self, slot: int, side_stream: Any) -> Any:
        """Record (and return) the event the compute stream waits on before using the slot."""
        ready = self._engine().record(side_stream)
        self._copied[slot] = ready
        return ready

    def _engine(self) -> CopyEngine:
        # Only a ring with an engine copies in on a side stream.
        assert self.engine is not None, "copying into a slot needs a copy engine"
        return self.engine

    def close(self) -> None:
        """Free the slots and the staging ring once no copy or compute still uses them: a copy into a slot (from
        its staging buffer) may still run on the side stream, and freeing memory it writes, or unpinning pages
        it reads, is undefined behaviour CUDA never reports (HostArena.close also waits for the device)."""
        for event in [*self._copied.values(), *self._freed.values()]:
            self._engine().host_wait(event, "slot ring close")
        self._copied.clear()
        self._freed.clear()
        if self.engine is not None:
            self.engine.frees([("slot", i) for i in range(self.count)]
                              + [("staging", i) for i in range(len(self.staging_buffers))])
        self.device_buffers = []
        self.staging_buffers = []
        if self.staging is not None:
            self.staging.close()
            self.staging = None
