"""The readers of what a worker writes (issue #31, item 3) on real files, FIFOs, links and pipes:
nothing blocks, nothing but a regular file is read, memory stays under a line's cap."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from jobs.contract import protocol
from jobs.contract.lines import Dropped, LineSplitter
from lab_attendant.executors.eventfile import FileTail, Refused, read_events


def test_the_splitter_drops_an_over_long_line_once_and_resyncs_at_its_newline():
    s = LineSplitter(10)
    assert s.feed(b"short\nabcdefgh") == [b"short"]
    out = s.feed(b"ijkl")                               # passes the cap: reported now
    assert len(out) == 1 and isinstance(out[0], Dropped) and out[0].head == b"abcdefgh"
    assert s.pending_bytes == 0
    assert s.feed(b"x" * 1000) == []                    # still inside it: nothing, nothing kept
    assert s.pending_bytes == 0
    assert s.feed(b"tail\nnext\n") == [b"next"]         # resynced after its newline
    assert s.feed(b"0123456789\n") == [b"0123456789"]   # exactly the cap is kept
    assert [type(x) for x in s.feed(b"0123456789A\nok\n")] == [Dropped, bytes]


def test_the_splitter_joins_a_line_fed_in_pieces():
    s = LineSplitter(100)
    assert s.feed(b"ab") == [] and s.feed(b"cd") == [] and s.feed(b"e\nf") == [b"abcde"]
    assert s.rest() == b"f" and s.rest() == b""


def test_a_48_mib_line_on_the_event_pipe_keeps_the_buffer_under_the_cap():
    buf = protocol.LineBuffer()
    chunk = b"x" * 65536
    rejected = []
    for _ in range(48 * 16):
        rejected += list(buf.feed(chunk))
        assert buf._lines.pending_bytes <= protocol.MAX_LINE_BYTES
    after = list(buf.feed(b"\n" + protocol.encode(protocol.HEARTBEAT)))
    assert len(rejected) == 1 and isinstance(rejected[0], protocol.Rejected)
    assert "dropped" in rejected[0].reason
    assert [type(e) for e in after] == [protocol.Heartbeat]        # the next line is read


def test_an_events_file_swapped_for_a_fifo_is_refused_without_blocking(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    os.mkfifo(path)
    done = threading.Event()
    got: list = []

    def read() -> None:
        got.extend(read_events(FileTail(path)))
        done.set()
    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), "reading a FIFO with no writer blocked"
    assert len(got) == 1 and isinstance(got[0], protocol.Rejected)
    assert "is a FIFO, not read" in got[0].reason


def test_a_symlink_to_dev_zero_is_refused_once(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    path.symlink_to("/dev/zero")
    tail = FileTail(path)
    first = tail.read()
    assert len(first) == 1 and isinstance(first[0], Refused)
    assert "symbolic link" in first[0].reason
    assert tail.read() == []                            # reported once, not every tick
    path.unlink()
    path.write_bytes(protocol.encode(protocol.HEARTBEAT))
    assert [type(e) for e in read_events(tail)] == [protocol.Heartbeat]


def test_a_run_folder_swapped_for_a_link_is_refused(tmp_path: Path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "events.jsonl").write_bytes(protocol.encode(protocol.HEARTBEAT))
    (tmp_path / "run").symlink_to(real)
    out = FileTail(tmp_path / "run" / "events.jsonl").read()
    assert len(out) == 1 and isinstance(out[0], Refused) and "plain folder" in out[0].reason


def test_a_big_file_is_read_a_budget_per_call_and_an_over_long_line_dropped(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    beat = protocol.encode(protocol.HEARTBEAT)
    path.write_bytes(beat + b"y" * (3 << 20) + b"\n" + beat * 10)
    tail = FileTail(path, budget_bytes=1 << 20)
    first = read_events(tail)
    assert [type(e) for e in first] == [protocol.Heartbeat, protocol.Rejected]
    assert "longer than" in first[1].reason and tail.offset <= 1 << 20
    rest: list = []
    for _ in range(5):
        rest += read_events(tail)
    assert [type(e) for e in rest] == [protocol.Heartbeat] * 10
    assert tail.offset == path.stat().st_size


def test_offsets_stay_at_line_starts_for_a_reattach(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    beat = protocol.encode(protocol.HEARTBEAT)
    path.write_bytes(beat + beat[:5])
    tail = FileTail(path)
    assert len(read_events(tail)) == 1 and tail.offset == len(beat)
    with open(path, "ab") as fh:
        fh.write(beat[5:])
    again = FileTail(path, tail.offset)                 # a restarted daemon, from the saved offset
    assert [type(e) for e in read_events(again)] == [protocol.Heartbeat]
