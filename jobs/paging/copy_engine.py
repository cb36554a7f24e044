"""The copy-engine seam: side streams, events, async copies and record_stream behind one small interface, so the
slot ring, staging ring, RAM-cache arena and expert cache run the same code on CUDA and, under a checker, on CPU.

CudaEngine is torch.cuda, call for call. ThreadEngine (CPU, tests) runs each side stream as a worker thread with a
FIFO queue (optional seeded random delays) and checks happens-before on every named buffer with vector clocks.
"""
from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# Every ordering the engine code asks for, by name: each call site passes its name, so a test can drop exactly one
# (ThreadEngine(skip=...)) and see the checker fail. "resident record_stream" is the allocator's lifetime rule, not a
# wait, but is dropped and checked the same way.
WAITS = (
    "slot ready",               # compute stream waits for a layer's copy into its slot (or a resident layer's copy)
    "slot freed",               # side stream waits for the last kernel that read a slot before copying into it
    "staging copied",           # host waits for the copy out of a staging buffer before refilling it
    "slot ring close",          # host waits for every copy and reader before the ring's buffers are freed
    "resident record_stream",   # a resident layer allocated on the side stream is marked as used on compute
    "expert ready",             # compute stream waits for an expert's copy into its cache slot
    "expert slot freed",        # side stream waits for the last reader of a cache slot before copying into it
    "expert staging copied",    # host waits for the copy out of an expert staging slot before refilling it
    "expert cache close",       # host waits for the cache's side stream before the slots are freed
    "expert store close",       # host waits for the staged copies before the store's arena is freed
    "stall timing",             # host waits for a timing event before reading it (orders no buffer)
)


class CopyOrderError(AssertionError):
    """ThreadEngine saw an access that no wait orders after a conflicting one: a race the GPU would not report."""


class CopyEngine(Protocol):
    """What the paging engine does with streams. `buffer` names (slot 0, staging 1, expert in RAM (2, 5)...) are
    for the checker: CudaEngine ignores them."""

    name: str

    def new_stream(self) -> Any: ...
    def compute_stream(self) -> Any: ...
    def run(self, stream: Any, work: Callable[[], object], *, reads: Iterable[Hashable] = (),
            writes: Iterable[Hashable] = (), allocates: Iterable[Hashable] = ()) -> None: ...
    def record(self, stream: Any, *, timing: bool = False) -> Any: ...
    def wait(self, stream: Any, event: Any, why: str) -> None: ...
    def host_wait(self, event: Any, why: str) -> None: ...
    def stream_sync(self, stream: Any, why: str) -> None: ...
    def done(self, event: Any) -> bool: ...
    def elapsed_s(self, begin: Any, end: Any) -> float: ...
    def record_stream(self, tensors: Iterable[torch.Tensor], stream: Any, buffer: Hashable) -> None: ...
    def reads(self, stream: Any, buffers: Iterable[Hashable]) -> None: ...
    def host_writes(self, buffers: Iterable[Hashable]) -> None: ...
    def frees(self, buffers: Iterable[Hashable], *, pool: Any = None) -> None: ...


def _check_why(why: str) -> None:
    if why not in WAITS:
        raise ValueError(f"unknown wait {why!r}: add it to copy_engine.WAITS")


class CudaEngine:
    """torch.cuda as the engine used it before the seam: the same calls, in the same order."""

    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def run(self, stream, work, *, reads=(), writes=(), allocates=()) -> None:
        with torch.cuda.stream(stream):
            work()  # kernels and non_blocking copies are queued on `stream`

    def record(self, stream, *, timing: bool = False) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def wait(self, stream, event, why: str) -> None:
        stream.wait_event(event)

    def host_wait(self, event, why: str) -> None:
        event.synchronize()

    def stream_sync(self, stream, why: str) -> None:
        stream.synchronize()

    def done(self, event) -> bool:
        return event.query()

    def elapsed_s(self, begin, end) -> float:
        return begin.elapsed_time(end) / 1000

    def record_stream(self, tensors, stream, buffer) -> None:
        for t in tensors:
            t.record_stream(stream)

    def reads(self, stream, buffers) -> None:
        pass

    def host_writes(self, buffers) -> None:
        pass

    def frees(self, buffers, *, pool=None) -> None:
        pass


# -- the thread engine ------------------------------------------------------------------------------------------
Clock = dict[str, int]  # agent (a host thread or a stream) -> the last of its operations known to have happened


def _join(*clocks: Clock) -> Clock:
    out: Clock = {}
    for clock in clocks:
        for agent, tick in clock.items():
            if tick > out.get(agent, 0):
                out[agent] = tick
    return out


@dataclass
class _Event:
    clock: Clock                 # what the stream had done, or waited for, when the event was recorded
    fired: threading.Event = field(default_factory=threading.Event)
    at_s: float = 0.0            # perf_counter when it fired (timing events)


@dataclass
class _Buffer:
    write: tuple[str, int] | None = None                    # (agent, tick) of the last write
    reads: dict[str, int] = field(default_factory=dict)     # agent -> tick of its last read since that write
    allocated_on: str | None = None                         # the stream whose pool holds it
    used_on: set[str] = field(default_factory=set)          # streams it was record_stream'ed for


class _Stream:
    """One stream: its clock advances as work is queued (the checker's time is issue order, not the schedule's),
    and a worker thread runs the queue in FIFO order; the compute stream runs inline on the calling thread."""

    def __init__(self, name: str, engine: "ThreadEngine", inline: bool) -> None:
        self.name, self.engine, self.inline = name, engine, inline
        self.clock: Clock = {}
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = None if inline else threading.Thread(target=self._serve, name=name, daemon=True)
        if self._thread is not None:
            self._thread.start()

    def submit(self, work: Callable[[], object]) -> None:
        if self.inline:
            work()
        else:
            self._queue.put(work)

    def _serve(self) -> None:
        while (work := self._queue.get()) is not None:
            self.engine.delay()
            try:
                work()
            except BaseException as exc:  # kept, and raised on the host's next wait
                self.engine.failed(exc)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


class ThreadEngine:
    """Side streams as worker threads, checked: every access to a named buffer must happen after each conflicting
    one (write after read or write, read after write), by the vector clocks the waits carry. `skip` drops the named
    waits (mutation tests); `max_delay_s` sleeps a seeded random time before each queued operation."""

    name = "threads"

    def __init__(self, *, seed: int = 0, max_delay_s: float = 0.0, skip: Iterable[str] = ()) -> None:
        self.skip = frozenset(skip)
        for why in self.skip:
            _check_why(why)
        self.max_delay_s = max_delay_s
        self.waits = Counter[str]()          # how often each named wait ran (tests check every one is reached)
        self.violations: list[str] = []      # every race seen, first first (a raised one can cascade into others)
        self._rng = random.Random(seed)
        self._lock = threading.RLock()       # the clocks and buffer states; held only while checking
        self._hosts: dict[int, Clock] = {}
        self._buffers: dict[Hashable, _Buffer] = {}
        self._streams: list[_Stream] = []
        self._error: BaseException | None = None
        self._compute = _Stream("compute stream", self, inline=True)

    # -- streams and events ---------------------------------------------------------------------------------
    def new_stream(self) -> _Stream:
        stream = _Stream(f"side stream {len(self._streams) + 1}", self, inline=False)
        self._streams.append(stream)
        return stream

    def compute_stream(self) -> _Stream:
        return self._compute

    def run(self, stream: _Stream, work: Callable[[], object], *, reads: Iterable[Hashable] = (),
            writes: Iterable[Hashable] = (), allocates: Iterable[Hashable] = ()) -> None:
        with self._lock:
            tick = self._issue(stream)
            for buffer in allocates:
                self._buffers[buffer] = _Buffer(allocated_on=stream.name)
            for buffer in reads:
                self._access(stream.name, tick, stream.clock, buffer, write=False)
            for buffer in writes:
                self._access(stream.name, tick, stream.clock, buffer, write=True)
        stream.submit(work)

    def record(self, stream: _Stream, *, timing: bool = False) -> _Event:
        with self._lock:
            self._issue(stream)
            event = _Event(dict(stream.clock))

        def fire() -> None:
            event.at_s = time.perf_counter()
            event.fired.set()
        stream.submit(fire)
        return event

    def wait(self, stream: _Stream, event: _Event, why: str) -> None:
        if self._dropped(why):
            return
        with self._lock:
            stream.clock = _join(stream.clock, self._host(), event.clock)
        stream.submit(event.fired.wait)
        if stream.inline:  # the compute stream has waited on this thread: a failed copy surfaces here
            self._raise_failure()

    def host_wait(self, event: _Event, why: str) -> None:
        if self._dropped(why):
            return
        event.fired.wait()
        self._raise_failure()
        with self._lock:
            ident = threading.get_ident()
            self._hosts[ident] = _join(self._host(), event.clock)

    def stream_sync(self, stream: _Stream, why: str) -> None:
        self.host_wait(self.record(stream), why)

    def done(self, event: _Event) -> bool:
        return event.fired.is_set()

    def elapsed_s(self, begin: _Event, end: _Event) -> float:
        if not (begin.fired.is_set() and end.fired.is_set()):
            raise CopyOrderError("elapsed time read from a timing event that has not fired: wait for it first")
        return end.at_s - begin.at_s

    def record_stream(self, tensors: Iterable[torch.Tensor], stream: _Stream, buffer: Hashable) -> None:
        if self._dropped("resident record_stream"):
            return
        with self._lock:
            self._buffers.setdefault(buffer, _Buffer()).used_on.add(stream.name)

    # -- checker declarations ---------------------------------------------------------------------------------
    def reads(self, stream: _Stream, buffers: Iterable[Hashable]) -> None:
        """Kernels on `stream` read `buffers` from here on (the compute stream, before a layer or expert runs)."""
        with self._lock:
            tick = self._issue(stream)
            for buffer in buffers:
                state = self._buffers.get(buffer)
                if state is not None and state.allocated_on not in (None, stream.name) \
                        and stream.name not in state.used_on:
                    self._violation(
                        f"{stream.name} reads {buffer!r}, allocated on {state.allocated_on}'s pool, without "
                        f"record_stream: the allocator could hand its memory out again while {stream.name} reads it")
                self._access(stream.name, tick, stream.clock, buffer, write=False)

    def host_writes(self, buffers: Iterable[Hashable]) -> None:
        with self._lock:
            agent, tick, clock = self._host_tick()
            for buffer in buffers:
                self._access(agent, tick, clock, buffer, write=True)

    def frees(self, buffers: Iterable[Hashable], *, pool: _Stream | None = None) -> None:
        """The host frees (or unpins) `buffers`: every access to them must be known to have finished, but those on
        `pool`, the stream whose allocator pool holds them (the caching allocator reuses a block in its stream's
        order)."""
        with self._lock:
            agent, tick, clock = self._host_tick()
            if pool is not None:
                clock = {**clock, pool.name: 1 << 62}
            for buffer in buffers:
                self._access(agent, tick, clock, buffer, write=True, verb="frees")
                self._buffers.pop(buffer, None)

    def close(self) -> None:
        """Stop the worker threads after their queues ran; a failure in one is raised here."""
        for stream in self._streams:
            stream.stop()
        self._streams.clear()
        self._raise_failure()

    # -- internals ----------------------------------------------------------------------------------------------
    def delay(self) -> None:
        if self.max_delay_s:
            with self._lock:
                pause_s = self._rng.uniform(0, self.max_delay_s)
            time.sleep(pause_s)

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._error = self._error or exc

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise RuntimeError("a copy on a ThreadEngine side stream failed") from self._error

    def _violation(self, message: str) -> None:
        self.violations.append(message)
        raise CopyOrderError(message)

    def _dropped(self, why: str) -> bool:
        _check_why(why)
        self.waits[why] += 1
        return why in self.skip

    def _host(self) -> Clock:
        return self._hosts.setdefault(threading.get_ident(), {})

    def _host_tick(self) -> tuple[str, int, Clock]:
        agent = f"host thread {threading.current_thread().name}"
        clock = self._host()
        clock[agent] = clock.get(agent, 0) + 1
        return agent, clock[agent], clock

    def _issue(self, stream: _Stream) -> int:
        """Queue one operation on `stream`: it happens after the issuing thread's past and the stream's."""
        stream.clock = _join(stream.clock, self._host())
        stream.clock[stream.name] = stream.clock.get(stream.name, 0) + 1
        return stream.clock[stream.name]

    def _access(self, agent: str, tick: int, clock: Clock, buffer: Hashable, *, write: bool,
                verb: str | None = None) -> None:
        state = self._buffers.setdefault(buffer, _Buffer())
        verb = verb or ("writes" if write else "reads")
        earlier = [("write", *state.write)] if state.write is not None else []
        if write:
            earlier += [("read", other, t) for other, t in state.reads.items()]
        for kind, other, t in earlier:
            if other != agent and clock.get(other, 0) < t:
                self._violation(
                    f"{agent} {verb} {buffer!r} while {other}'s {kind} of it (its operation {t}) is not known to "
                    f"have finished: a wait (wait_event / synchronize) is missing between them")
        if write:
            state.write, state.reads = (agent, tick), {}
        else:
            state.reads[agent] = max(tick, state.reads.get(agent, 0))


def engine_for(device: torch.device, engine: CopyEngine | None = None) -> CopyEngine | None:
    """The engine a load uses: the one given (tests: ThreadEngine on cpu), CUDA's on a CUDA device, else none
    (cpu: layers and experts compute where they were read, copies are plain and synchronous)."""
    if engine is not None:
        return engine
    return CudaEngine(device) if device.type == "cuda" else None
