"""Retries on a real store: failed/lost runs with budget get a linked retry after an exponential
back-off, derived idempotently from the store; guard kills, oom, cancels and timeouts never do;
`retry ID` by hand; a version-2 store migrates."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab_attendant.cli.main import main
from lab_attendant.config import parse_config
from lab_attendant.errors import ConfigError, UserError
from lab_attendant.store.db import Store
from lab_attendant.store.retry import backoff_s, ensure_retries, retry_now
from lab_attendant.store.states import RunState

from ..conftest import write_config


def _ended(store: Store, state: RunState, max_retries: int = 2):
    run = store.submit(kind="sleepy", params={"seconds": 1.0}, priority=3, timeout_s=60,
                       needs_paging=False, max_retries=max_retries)
    store.transition(run.id, RunState.STARTING, "claimed")
    if state is not RunState.LOST:
        store.transition(run.id, RunState.RUNNING, "started")
    return store.transition(run.id, state, f"ended {state}")


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(a, 10, 50) for a in (1, 2, 3, 4)] == [10, 20, 40, 50]


def test_failed_and_lost_runs_are_retried_with_backoff_until_the_budget_is_spent(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    first = _ended(store, RunState.FAILED)
    lost = _ended(store, RunState.LOST, max_retries=1)
    made = ensure_retries(store, base_s=0.3, max_s=10)
    assert [(r.retry_of, r.attempt) for r in made] == [(first.id, 2), (lost.id, 2)]
    assert ensure_retries(store, base_s=0.3, max_s=10) == []          # idempotent
    second = made[0]
    assert second.params == {"seconds": 1.0} and second.priority == 3
    assert store.claim_next(exclude_paging=False) is None             # backing off
    time.sleep(0.35)
    claimed = store.claim_next(exclude_paging=False)
    assert claimed.id == second.id
    store.transition(second.id, RunState.RUNNING, "started")
    store.transition(second.id, RunState.FAILED, "again")
    (third,) = ensure_retries(store, base_s=0.3, max_s=10)
    assert third.attempt == 3 and third.not_before - time.time() > 0.4   # 2 x base
    store.transition(third.id, RunState.STARTING, "claimed")
    store.transition(third.id, RunState.FAILED, "and again")
    assert ensure_retries(store, base_s=0.3, max_s=10) == []          # 2 retries made: done
    assert [e.kind for e in store.events(first.id)][-1] == "retry"


@pytest.mark.parametrize("state", [RunState.OOM, RunState.KILLED_THERMAL, RunState.CANCELLED,
                                   RunState.TIMED_OUT, RunState.SUCCEEDED])
def test_guard_kills_oom_cancels_and_timeouts_are_never_retried(tmp_path: Path, state):
    store = Store(tmp_path / "s.sqlite3")
    _ended(store, state, max_retries=5)
    assert ensure_retries(store, base_s=0, max_s=0) == []


def test_retry_by_hand(tmp_path: Path, capsys):
    store = Store(tmp_path / "s.sqlite3")
    oom = _ended(store, RunState.OOM, max_retries=0)
    again = retry_now(store, oom.id)
    assert again.retry_of == oom.id and again.attempt == 2 and again.state is RunState.QUEUED
    with pytest.raises(UserError, match=f"already retried as run {again.id}"):
        retry_now(store, oom.id)
    with pytest.raises(UserError, match="only a run that has ended"):
        retry_now(store, again.id)
    with pytest.raises(UserError, match="succeeded"):
        retry_now(store, _ended(store, RunState.SUCCEEDED).id)


def test_retry_verb_and_submit_retries(tmp_path: Path, capsys):
    cfg = write_config(tmp_path)
    argv = ["--config", str(cfg)]
    assert main([*argv, "submit", "sleepy", "--retries", "3"]) == 0
    assert main([*argv, "submit", "sleepy", "--retries", "101"]) == 2
    assert main([*argv, "retry", "1"]) == 2                            # still queued
    assert "only a run that has ended" in capsys.readouterr().err
    assert main([*argv, "cancel", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "retry", "1", "--json"]) == 0
    import json
    out = json.loads(capsys.readouterr().out)
    assert out["retry_of"] == 1 and out["max_retries"] == 3 and out["state"] == "queued"


def test_retries_config(tmp_path: Path):
    base = {"worker": {"extra_kinds": ["tests.fixtures.kinds"]}}
    cfg = parse_config({**base, "retries": {"kinds": {"sleepy": 2}}}, base_dir=tmp_path, source=None)
    assert cfg.retries_for("sleepy") == 2 and cfg.retries_for("crash") == 0
    with pytest.raises(ConfigError, match="unknown kind nope"):
        parse_config({**base, "retries": {"kinds": {"nope": 1}}}, base_dir=tmp_path, source=None)
    with pytest.raises(ConfigError, match="'retries.kinds.sleepy' must be"):
        parse_config({**base, "retries": {"kinds": {"sleepy": -1}}}, base_dir=tmp_path, source=None)
    s = {"id": "n", "cron": "@daily", "kind": "sleepy", "retries": 1}
    cfg = parse_config({**base, "retries": {"kinds": {"sleepy": 4}}, "schedules": [s]},
                       base_dir=tmp_path, source=None)
    assert cfg.retries_for("sleepy", cfg.schedules[0]) == 1
