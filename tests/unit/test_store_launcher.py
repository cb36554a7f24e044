"""The store's transition rules and the launcher's SIGTERM -> SIGKILL escalation (FakeHost)."""
from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from lab_attendant.errors import StoreError, TransitionError
from lab_attendant.executors.local import LocalExecutor, LocalRun
from lab_attendant.store.db import Store
from lab_attendant.store.states import RunState
from tests.unit.fakes import FakeHost


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def _submit(store: Store, priority: int = 0, paging: bool = False) -> int:
    return store.submit(kind="k", params={"a": 1}, priority=priority, timeout_s=5,
                        needs_paging=paging).id


def test_pragmas(store: Store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2     # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_transition_records_reason_and_rejects_illegal_moves(store: Store):
    rid = _submit(store)
    with pytest.raises(TransitionError, match="queued -> succeeded"):
        store.transition(rid, RunState.SUCCEEDED, "skip ahead")
    store.transition(rid, RunState.HELD, "waiting for x")
    assert store.transition(rid, RunState.STARTING, "race", expect={RunState.QUEUED}) is None
    store.transition(rid, RunState.CANCELLED, "user")
    run = store.get(rid)
    assert run.state == "cancelled" and run.reason == "user" and run.ended_at is not None
    assert [(e.from_state, e.to_state, e.reason) for e in store.events(rid)] == [
        (None, "queued", "submitted"), ("queued", "held", "waiting for x"),
        ("held", "cancelled", "user")]
    with pytest.raises(TransitionError, match="state changes go through transition"):
        store.update_run(rid, state="queued")


def test_claim_order_priority_then_age_and_paging_filter(store: Store):
    low, high, paging = _submit(store, 0), _submit(store, 5), _submit(store, 9, paging=True)
    assert store.claim_next(exclude_paging=True).id == high
    assert store.claim_next(exclude_paging=True).id == low
    assert store.claim_next(exclude_paging=True) is None
    claimed = store.claim_next(exclude_paging=False)
    assert claimed.id == paging and claimed.state == "starting" and claimed.started_at


def test_cancel_of_waiting_run_is_immediate_and_of_active_run_is_a_request(store: Store):
    waiting, active = _submit(store), _submit(store)
    store.transition(active, RunState.STARTING, "go")
    assert store.request_cancel(waiting).state == "cancelled"
    run = store.request_cancel(active)
    assert run.state == "starting" and run.cancel_requested
    assert store.request_cancel(999) is None


def test_store_from_a_newer_schema_is_refused(tmp_path: Path):
    Store(tmp_path / "db").close()
    with sqlite3.connect(tmp_path / "db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "db")


class _Proc:
    pid = 4242

    def poll(self):
        return None


def _worker(launcher: LocalExecutor) -> LocalRun:
    return LocalRun(executor=launcher, run_id=1, needs_paging=False, proc=_Proc(), events_fd=-1,
                    output_fd=-1, started_mono=0.0, deadline_mono=10.0)


def test_stop_sends_sigterm_once_then_sigkill_after_grace():
    host = FakeHost()
    launcher = LocalExecutor(host, kill_grace_s=5.0)
    w = _worker(launcher)
    launcher.stop(w, RunState.CANCELLED, "cancelled by user")
    launcher.stop(w, RunState.TIMED_OUT, "later reason loses")
    assert host.signals == [(4242, signal.SIGTERM)]
    assert w.stop_state is RunState.CANCELLED and w.stop_reason == "cancelled by user"
    host.advance(4.9)
    assert not launcher.escalate(w)
    host.advance(0.2)
    assert launcher.escalate(w)
    assert not launcher.escalate(w)               # SIGKILL is sent once
    assert host.signals == [(4242, signal.SIGTERM), (4242, signal.SIGKILL)]


def test_escalate_does_nothing_before_a_stop():
    host = FakeHost()
    launcher = LocalExecutor(host, kill_grace_s=0.0)
    w = _worker(launcher)
    host.advance(100)
    assert not launcher.escalate(w) and host.signals == []


def test_a_skipped_submission_is_never_visible_as_queued(store: Store):
    run = store.submit(kind="k", params={}, priority=0, timeout_s=5, needs_paging=True,
                       schedule_id="nightly", reason="fired", skip_reason="paging is off")
    assert run.state == "skipped" and run.reason == "paging is off" and run.ended_at
    assert [(e.from_state, e.to_state) for e in store.events(run.id)] == [
        (None, "queued"), ("queued", "skipped")]
    assert store.claim_next(exclude_paging=False) is None


class _DeafGroupsHost(FakeHost):
    """Groups that ignore SIGTERM and die on SIGKILL; waiting advances the clock. Each live
    leader carries the run marker in `markers`."""

    def __init__(self) -> None:
        super().__init__()
        self.markers: dict[int, str] = {}

    def is_same_process(self, pid: int, create_time) -> bool:
        return pid in self.alive_groups

    def env_value(self, pid: int, name: str) -> str | None:
        return self.markers.get(pid) if pid in self.alive_groups else None

    def group_pids(self, pgid: int) -> list[int]:
        return [pgid] if pgid in self.alive_groups else []

    def pid_alive(self, pid: int) -> bool:
        return pid in self.alive_groups

    def killpg(self, pgid: int, sig: int) -> bool:
        alive = super().killpg(pgid, sig)
        if sig == signal.SIGKILL:
            self.alive_groups.discard(pgid)
        return alive

    def group_alive(self, pgid: int) -> bool:
        self.advance(0.05)
        return super().group_alive(pgid)


def test_reconcile_kills_all_live_groups_within_one_shared_grace(tmp_path: Path, monkeypatch):
    """Every leftover group gets SIGTERM before any SIGKILL: start-up waits one kill_grace_s in
    all, not one per run, and every run ends lost."""
    from lab_attendant.config import parse_config
    from lab_attendant.daemon.loop import Daemon
    from lab_attendant.executors.workerfence import run_marker

    cfg = parse_config({"paths": {"state_dir": "var"}, "limits": {"kill_grace_s": 2.0}},
                       base_dir=tmp_path, source=None)
    host = _DeafGroupsHost()
    daemon = Daemon(cfg, host=host)
    daemon.store = Store(cfg.db_path)
    try:
        pids = [4242, 4343, 4444]
        for pid in pids:
            run = daemon.store.submit(kind="sleepy", params={}, priority=0, timeout_s=60, needs_paging=False)
            daemon.store.transition(run.id, RunState.STARTING, "spawned")
            daemon.store.transition(run.id, RunState.RUNNING, "hello")
            daemon.store.update_run(run.id, pid=pid)
            host.markers[pid] = run_marker(cfg.runs_dir / str(run.id))
        host.alive_groups.update(pids[:2])           # the third run's worker is already gone
        start = host.now
        daemon.reconcile()
        assert set(host.signals[:2]) == {(4242, signal.SIGTERM), (4343, signal.SIGTERM)}
        assert set(host.signals[2:4]) == {(4242, signal.SIGKILL), (4343, signal.SIGKILL)}
        assert host.now - start <= 2.0 + 0.2           # one grace for both, not 2 x 2.0 s
        runs = daemon.store.list_runs(states=[RunState.LOST])
        assert len(runs) == 3 and not host.alive_groups
        assert sum("was still running and was killed" in r.reason for r in runs) == 2
    finally:
        daemon.store.close()


def test_reconcile_feeds_the_watchdog_while_it_waits_for_groups():
    """A grace of 10 s spent waiting for SIGTERM-deaf groups: the watchdog callback keeps being
    called (systemd would otherwise kill a daemon still reconciling)."""
    from lab_attendant.daemon.reconcile import kill_groups

    host = _DeafGroupsHost()
    host.alive_groups.update({10, 11})
    feeds: list[float] = []
    kill_groups(host, [10, 11], 10.0, lambda: feeds.append(host.now))
    assert not host.alive_groups and len(feeds) > 50
    assert max(b - a for a, b in zip(feeds, feeds[1:])) < 1.0


def test_merge_metrics_folds_keys_in_and_keeps_the_rest(tmp_path: Path):
    store = Store(tmp_path / "db.sqlite3")
    try:
        rid = store.submit(kind="sleepy", params={}, priority=0, timeout_s=60, needs_paging=False).id
        store.merge_metrics(rid, {"tokens": 3, "model": "a"})
        store.merge_metrics(rid, {"tokens": 5, "engine_variants": "PFFP"})
        assert store.get(rid).metrics == {"tokens": 5, "model": "a", "engine_variants": "PFFP"}
        store.merge_metrics(rid + 100, {"x": 1})      # a run that is gone: nothing to fold into
    finally:
        store.close()
