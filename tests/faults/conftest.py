"""Fault-injection helpers: real daemons, real SQLite, real signals; the invariant every
scenario ends with, and a small tmpfs for a state dir that fills up."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from lab_attendant.store.states import TERMINAL, RunState

from ..conftest import Lab, pid_alive, wait_for  # noqa: F401 - re-exported for the tests

TERMINAL_NAMES = {s.value for s in TERMINAL}


def rows(lab: Lab) -> list[tuple[int, str, int | None]]:
    with sqlite3.connect(f"file:{lab.state_dir / 'lab_attendant.sqlite3'}?mode=ro", uri=True,
                         timeout=60) as conn:
        return list(conn.execute("SELECT id, state, pid FROM runs ORDER BY id"))


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies count as gone: only live members matter.
    return any(pid_alive(int(p)) for p in _group_members(pgid))


def _group_members(pgid: int) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        out.append(d)
            except (OSError, IndexError, ValueError):
                continue
    return out


def check_invariant(lab: Lab, submitted: list[int], *, allow_queued: bool = True) -> dict:
    """Every submitted run is in exactly one row, terminal (or still queued), its process group
    is gone, and its output folder holds no partial file. Returns state -> count."""
    found = rows(lab)
    ids = [r[0] for r in found]
    assert sorted(ids) == sorted(set(ids)), "a run id appears twice"
    by_id = {r[0]: r for r in found}
    missing = [i for i in submitted if i not in by_id]
    assert not missing, f"submitted runs without a row: {missing}"
    assert len(found) == len(submitted), f"{len(found)} rows for {len(submitted)} submissions"
    counts: dict[str, int] = {}
    for rid, state, pid in found:
        ok = state in TERMINAL_NAMES or (allow_queued and state == RunState.QUEUED.value)
        assert ok, f"run {rid} ended {state}"
        if pid is not None:
            assert not group_alive(pid), f"run {rid}: process group {pid} still alive"
        out = lab.state_dir / "runs" / str(rid) / "output"
        if out.is_dir():
            partial = [p.name for p in out.rglob(".*.tmp*")]
            assert not partial, f"run {rid} left partial files {partial}"
            result = out / "result.json"
            if result.exists():
                json.loads(result.read_text())
        counts[state] = counts.get(state, 0) + 1
    return counts


@pytest.fixture
def small_tmpfs(lab: Lab):
    """lab.state_dir on a 4 MiB tmpfs; skipped where mounting is not allowed."""
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(lab.state_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the disk-full scenario needs root or CAP_SYS_ADMIN")
    yield lab.state_dir
    subprocess.run(["umount", "-l", str(lab.state_dir)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system says ENOSPC."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        chunk = b"\0" * 65536
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        while True:   # the last few bytes too
            try:
                fh.write(b"\0" * 512)
            except OSError:
                break
    return filler


REPORT_ENV = "LAB_ATTENDANT_FAULT_REPORT"


def report(scenario: str, **counts) -> None:
    """Append one scenario's measured counts (JSON line) to $LAB_ATTENDANT_FAULT_REPORT, the
    source of the table in docs/reliability.md; a no-op without it."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"scenario": scenario, **counts}) + "\n")


def sensors_file(path: Path, temperature_c: float = 60.0) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": [{"index": 0, "temperature_c": temperature_c,
                                         "memory_used_bytes": 1 << 30,
                                         "memory_total_bytes": 11811160064, "processes": []}]}))
    os.replace(tmp, path)
