"""A store an older lab-attendant left behind is migrated in place, its rows kept: each schema version's
columns are dropped from a new store to make the old one, which Store() must bring up to date."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lab_attendant.store.db import Store
from lab_attendant.store.states import RunState
from lab_attendant.store.tables import SCHEMA_VERSION

# What each version added to `runs`: a store of version V lacks the columns of every later one.
ADDED = {2: (["hold_code"], []),
         3: (["retry_of", "attempt", "max_retries", "not_before"], ["ix_runs_retry_of"]),
         4: (["name", "after_json", "executor", "executor_job_id"], ["ix_runs_name"]),
         5: ([], []),     # 5 added the run id high-water trigger (dropped in old_store)
         6: (["progress_phase", "peak_rss_bytes", "peak_gpu_bytes", "after_any_json", "after_notok_json",
              "singleton", "notify"], [])}


def old_store(db: Path, version: int) -> int:
    """A store as a version-`version` daemon left it, holding one queued run; returns its id."""
    store = Store(db)
    rid = store.submit(kind="sleepy", params={}, priority=0, timeout_s=60, needs_paging=True).id
    store.close()
    with sqlite3.connect(db) as conn:
        for later in range(version + 1, SCHEMA_VERSION + 1):
            columns, indexes = ADDED[later]
            for index in indexes:
                conn.execute(f"DROP INDEX {index}")
            for column in columns:
                conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
        if version < 5:
            conn.execute("DROP TRIGGER runs_id_high_water")
            conn.execute("DELETE FROM meta WHERE key = 'run_id_high_water'")
        conn.execute(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'")
    return rid


def _delete_run(db: Path, rid: int) -> None:
    """What `prune` does to a run's rows."""
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM run_events WHERE run_id = ?", (rid,))
        conn.execute("DELETE FROM runs WHERE id = ?", (rid,))


@pytest.mark.parametrize("version", [4, SCHEMA_VERSION])
def test_run_ids_are_not_reused_after_the_newest_run_is_deleted(tmp_path: Path, version: int):
    """A new run must not take a pruned run's id (its logs/runs/ID.log, links, `--after`)."""
    db = tmp_path / "db.sqlite3"
    first = old_store(db, version)
    store = Store(db)           # migrates a version-4 store
    try:
        second = store.submit(kind="sleepy", params={}, priority=0, timeout_s=60,
                              needs_paging=False).id
        assert second == first + 1
        _delete_run(db, second)
        _delete_run(db, first)
        third = store.submit(kind="sleepy", params={}, priority=0, timeout_s=60,
                             needs_paging=False).id
        assert third == second + 1
    finally:
        store.close()


def test_every_version_is_listed():
    assert sorted(ADDED) == list(range(2, SCHEMA_VERSION + 1))


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_an_old_store_is_migrated_in_place_and_its_run_reads_with_defaults(tmp_path: Path, version: int):
    db = tmp_path / "db.sqlite3"
    rid = old_store(db, version)
    store = Store(db)
    try:
        assert store.get_meta("schema_version") == SCHEMA_VERSION
        run = store.get(rid)
        assert run.state is RunState.QUEUED and run.kind == "sleepy"
        assert (run.attempt, run.max_retries, run.retry_of, run.not_before) == (1, 0, None, None)
        assert (run.name, run.after, run.executor, run.executor_job_id) == (None, [], "local", None)
        assert (run.after_any, run.after_notok, run.singleton, run.notify) == ([], [], False, None)
        store.transition(rid, RunState.HELD, "paging off", hold_code="paging_off")
        assert store.get(rid).hold_code == "paging_off"
        assert store.count_by_state() == {RunState.HELD: 1}
        with sqlite3.connect(db) as conn:   # the indexes came back too
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"ix_runs_retry_of", "ix_runs_name"} <= names
    finally:
        store.close()

