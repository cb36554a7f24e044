"""The store under fault: a full state disk (real tmpfs) and a damaged store file, with the real
daemon, real workers and real SQLite."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import check_invariant, fill, pid_alive, report, rows, wait_for

pytestmark = pytest.mark.faults
DISK_FULL_REPEATS, CORRUPT_REPEATS = 3, 3


@pytest.mark.parametrize("attempt", range(DISK_FULL_REPEATS))
def test_state_disk_full_pauses_admissions_and_loses_nothing(lab, small_tmpfs, attempt):
    daemon = lab.start_daemon()
    ids = [lab.submit("sleepy", "seconds=5", "quiet=true") for _ in range(2)]
    wait_for(lambda: all(r[1] == "running" for r in rows(lab)) and len(_worker_pids(lab)) == 2,
             30, "two runs running")
    filler = fill(small_tmpfs)
    status = small_tmpfs / "daemon-status.json"
    wait_for(lambda: json.loads(status.read_bytes().strip() or b"{}").get("store_fault"), 20,
             "the daemon to report the store fault")
    st = json.loads(lab.cli("status", "--json").stdout)
    assert st["store_fault"] and "full" in st["store_fault"]
    # The workers end meanwhile (their result.json cannot be written either); the daemon
    # reaps them, keeps their outcome in memory and stays alive.
    wait_for(lambda: not any(pid_alive(p) for p in _worker_pids(lab)), 40, "workers to exit")
    assert daemon.poll() is None
    assert all(r[1] == "running" for r in rows(lab))     # nothing could be written yet
    filler.unlink()
    late = lab.submit("sleepy", "seconds=0.2")            # admitted once writes work again
    ids.append(late)
    wait_for(lambda: all(r[1] in ("succeeded", "failed") for r in rows(lab)), 40,
             "every run to end after the disk has room again")
    counts = check_invariant(lab, ids, allow_queued=False)
    # The two in flight could not write their result.json (ENOSPC): failed, no partial file.
    assert counts == {"failed": 2, "succeeded": 1}
    assert lab.show(late)["state"] == "succeeded"
    for rid in ids[:2]:
        states = [e["to"] for e in lab.show(rid)["events"] if e["kind"] == "transition"]
        assert states[:3] == ["queued", "starting", "running"] and len(states) == 4
    assert "store fault" in lab.daemon_output() and "store writable again" in lab.daemon_output()
    assert json.loads(lab.cli("status", "--json").stdout)["store_fault"] is None
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    report("state disk full (4 MiB tmpfs) with 2 runs in flight", repeats=1,
           runs=len(ids), daemon_survived=1, ended=sum(counts.values()), late_run_admitted=1)


def _worker_pids(lab) -> list[int]:
    return [int(t) for p in lab.state_dir.glob("runs/*/output/worker.pid") if (t := p.read_text())]


@pytest.mark.parametrize("attempt", range(CORRUPT_REPEATS))
def test_damaged_store_stops_the_daemon_with_exit_3_and_one_sentence(lab, attempt):
    ids = [lab.submit("sleepy", "seconds=0.1") for _ in range(2)]
    assert lab.cli("db", "backup", str(lab.state_dir / "backups") + "/").returncode == 0
    db = lab.state_dir / "lab_attendant.sqlite3"
    with open(db, "r+b") as fh:
        fh.write(b"this is no longer an sqlite file")
    for suffix in ("-wal", "-shm"):
        (lab.state_dir / f"lab_attendant.sqlite3{suffix}").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(lab.config),
                           "daemon"], capture_output=True, text=True, env=lab.env(), timeout=60)
    assert proc.returncode == 3
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(db) in err[0] and "lab-attendant db restore" in err[0]
    assert "Traceback" not in proc.stderr
    assert lab.cli("db", "restore").returncode == 0
    assert check_invariant(lab, ids) == {"queued": 2}
    report("corrupt store", repeats=1, exit_3_one_line=1, restored_rows=2, runs_lost=0)
