"""Store faults on a real SQLite file: damaged file -> StoreUnusable with the recovery command;
refused writes -> StoreWriteError, queued in order by WriteBehind and replayed once the store
takes writes again; db check / backup / restore; the rotating automatic backup."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event

from lab_attendant.cli.main import main
from lab_attendant.errors import StoreUnusable, StoreWriteError
from lab_attendant.store import backup
from lab_attendant.store.db import Store
from lab_attendant.store.faults import StatusFile, WriteBehind
from lab_attendant.store.states import RunState

from ..conftest import ROOT, write_config


class ReadOnlySwitch:
    """SQLite's own `PRAGMA query_only` on every connection while on: writes fail with SQLite's
    "attempt to write a readonly database", as on a read-only mount."""

    def __init__(self, store: Store) -> None:
        self.store, self.on = store, False
        event.listen(store.engine, "connect", self._apply)

    def _apply(self, dbapi_conn, _record) -> None:
        dbapi_conn.execute(f"PRAGMA query_only={'ON' if self.on else 'OFF'}")

    def set(self, on: bool) -> None:
        self.on = on
        self.store.engine.dispose()   # new connections get the pragma


def _submit(store: Store):
    return store.submit(kind="sleepy", params={}, priority=0, timeout_s=60, needs_paging=False)


def test_damaged_file_names_the_file_and_the_recovery_command(tmp_path: Path):
    db = tmp_path / "lab_attendant.sqlite3"
    db.write_bytes(b"not a database, just bytes " * 200)
    with pytest.raises(StoreUnusable) as err:
        Store(db)
    text = str(err.value)
    assert str(db) in text and "lab-attendant db restore" in text and "\n" not in text


def test_refused_writes_are_queued_in_order_and_replayed(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    switch = ReadOnlySwitch(store)
    run = _submit(store)
    store.transition(run.id, RunState.STARTING, "claimed")
    clock = [100.0]
    faults: list = []
    wb = WriteBehind(store, lambda: clock[0], faults.append)
    switch.set(True)
    with pytest.raises(StoreWriteError):
        store.update_run(run.id, progress_done=1)
    assert wb.must(store.transition, run.id, RunState.RUNNING, "started",
                   expect={RunState.STARTING}) is None
    wb.may(store.update_run, run.id, progress_done=5)            # dropped while the store refuses
    wb.must(store.transition, run.id, RunState.SUCCEEDED, "exit 0")
    assert wb.fault and "readonly" in wb.fault and len(wb.pending) == 2 and faults[-1]
    assert store.get(run.id).state is RunState.STARTING      # reads still work
    assert not wb.retry()                                    # back-off not over yet
    clock[0] += 1.5
    assert not wb.retry() and wb.backoff_s == 2.0            # still refused: back-off doubles
    switch.set(False)
    clock[0] += 2.5
    assert wb.retry() and wb.fault is None and not wb.pending and faults[-1] is None
    final = store.get(run.id)
    assert final.state is RunState.SUCCEEDED and final.progress_done is None
    assert [e.to_state for e in store.events(run.id)] == ["queued", "starting", "running",
                                                          "succeeded"]


def test_status_file_is_rewritten_in_place(tmp_path: Path):
    sf = StatusFile(tmp_path / "daemon-status.json")
    sf.open()
    sf.write({"store_fault": "database or disk is full"})
    size = sf.path.stat().st_size
    assert StatusFile.read(sf.path)["store_fault"] == "database or disk is full"
    sf.write({"store_fault": None})
    assert sf.path.stat().st_size == size and StatusFile.read(sf.path)["store_fault"] is None
    sf.close()


def test_db_check_backup_restore(tmp_path: Path, capsys):
    cfg = write_config(tmp_path)
    argv = ["--config", str(cfg)]

    def cli(*args: str) -> str:
        # In its own process, so no connection of ours outlives it: a late WAL checkpoint from
        # one would write back the header this test damages.
        return subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", *argv, *args],
                              check=True, capture_output=True, text=True, cwd=ROOT).stdout

    cli("submit", "sleepy")
    assert ": ok" in cli("db", "check")
    bdir = tmp_path / "var" / "backups"
    cli("db", "backup", str(bdir / "lab_attendant-20260101-000000.sqlite3"))
    cli("submit", "sleepy")                                  # after the backup: not in it
    db = tmp_path / "var" / "lab_attendant.sqlite3"
    with open(db, "r+b") as fh:                                # damage the header
        fh.write(b"garbage garbage garbage garbage!")
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    capsys.readouterr()
    assert main([*argv, "list"]) == 1
    assert "lab-attendant db restore" in capsys.readouterr().err
    assert main([*argv, "db", "check"]) == 1
    assert main([*argv, "db", "restore"]) == 0
    assert list(tmp_path.glob("var/lab_attendant.sqlite3.corrupt-*"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_auto_backup_rotates_keeping_n(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    _submit(store)
    auto = backup.AutoBackup(store.db_path, tmp_path / "b", keep=3, interval_s=60)
    made = [auto.tick(t) for t in (1000.0, 1030.0, 1060.0, 1120.0, 1180.0, 1240.0)]
    assert made[1] is None and sum(m is not None for m in made) == 5
    left = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(left) == 3 and all(not backup.check(tmp_path / "b" / n) for n in left)
    os.utime(tmp_path / "b" / left[-1], (1240.0, 1240.0))
    assert backup.AutoBackup(store.db_path, tmp_path / "b", keep=3, interval_s=60).tick(1250.0) is None


def test_a_refused_read_is_a_read_error_and_a_refused_write_a_write_error(tmp_path: Path):
    """Both are StoreUnavailable (the daemon waits them out); only the write one says written."""
    from sqlalchemy.exc import OperationalError

    from lab_attendant.errors import StoreReadError, StoreUnavailable
    from lab_attendant.store.faults import translate
    exc = OperationalError("SELECT 1", {}, sqlite3.OperationalError("disk I/O error"))
    read, write = (translate(exc, tmp_path / "s.sqlite3", writing=w) for w in (False, True))
    assert isinstance(read, StoreReadError) and "cannot be read" in str(read)
    assert isinstance(write, StoreWriteError) and "cannot be written" in str(write)
    assert isinstance(read, StoreUnavailable) and isinstance(write, StoreUnavailable)
    assert not isinstance(read, StoreWriteError)
