"""afterok dependencies and user holds on a real SQLite store, and the daemon's loop (fake host)
never lifting a user hold: claim_next, the retry chain, cancel_unsatisfiable, hold/release."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.contract import protocol
from lab_attendant.errors import UserError
from lab_attendant.store.db import Store
from lab_attendant.store.deps import USER_HOLD, cancel_unsatisfiable, check_after, hold, release, waiting_for
from lab_attendant.store.states import RunState
from tests.unit.fakes import submit


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def _run(store: Store, *, after=(), max_retries: int = 0) -> int:
    return store.submit(kind="sleepy", params={}, priority=0, timeout_s=60, needs_paging=False,
                        after=after, max_retries=max_retries).id


def _end(store: Store, rid: int, state: RunState, reason: str = "done") -> None:
    store.transition(rid, RunState.STARTING, "claimed")
    store.transition(rid, state, reason)


def test_claim_next_takes_a_dependent_only_after_every_parent_succeeded(store: Store):
    a, b = _run(store), _run(store)
    child = _run(store, after=[a, b])
    assert store.claim_next(exclude_paging=False).id == a
    assert store.claim_next(exclude_paging=False).id == b
    assert store.claim_next(exclude_paging=False) is None        # parents still starting
    assert "after run 1 (starting), run 2 (starting)" == waiting_for(
        store, [store.get(child)])[child]
    store.transition(a, RunState.SUCCEEDED, "ok")
    assert store.claim_next(exclude_paging=False) is None        # b not yet
    store.transition(b, RunState.SUCCEEDED, "ok")
    assert store.claim_next(exclude_paging=False).id == child


def test_a_failed_parent_cancels_the_dependent_naming_it(store: Store):
    parent = _run(store)
    child = _run(store, after=[parent])
    grandchild = _run(store, after=[child])
    _end(store, parent, RunState.FAILED, "ValueError: boom")
    assert cancel_unsatisfiable(store) == [child, grandchild]   # the chain follows at once
    run = store.get(child)
    assert run.state is RunState.CANCELLED
    assert "run 1 (failed): ValueError: boom" in run.reason and "afterok" in run.reason
    assert "run 2 (cancelled)" in store.get(grandchild).reason
    assert cancel_unsatisfiable(store) == []


def test_a_parent_that_will_be_retried_keeps_its_dependent_waiting(store: Store):
    from lab_attendant.store.retry import ensure_retries
    parent = _run(store, max_retries=1)
    child = _run(store, after=[parent])
    _end(store, parent, RunState.FAILED, "flaky")
    assert cancel_unsatisfiable(store) == []                     # a retry is coming
    retry = ensure_retries(store, base_s=0, max_s=0)[0]
    assert "via retry" in waiting_for(store, [store.get(child)])[child]
    assert store.claim_next(exclude_paging=False).id == retry.id
    store.transition(retry.id, RunState.SUCCEEDED, "ok")
    assert store.claim_next(exclude_paging=False).id == child   # the chain's last attempt counts


def test_after_is_checked_at_submit(store: Store):
    ok, bad = _run(store), _run(store)
    _end(store, bad, RunState.OOM, "out of memory")
    assert check_after(store, [ok, ok]) == [ok]
    with pytest.raises(UserError, match="there is no run 99"):
        check_after(store, [99])
    with pytest.raises(UserError, match="already ended oom .* would never start"):
        check_after(store, [bad])


def test_hold_and_release_are_all_or_nothing(store: Store):
    a, b = _run(store), _run(store)
    _end(store, b, RunState.SUCCEEDED)
    with pytest.raises(UserError, match="run 2 is succeeded"):
        hold(store, [a, b])
    assert store.get(a).state is RunState.QUEUED                 # nothing changed
    assert hold(store, [a]) == ["run 1 held"]
    run = store.get(a)
    assert (run.state, run.hold_code) == (RunState.HELD, USER_HOLD)
    assert store.claim_next(exclude_paging=False) is None
    with pytest.raises(UserError, match="not held"):
        release(store, [b])
    assert release(store, [a]) == ["run 1 released"]
    assert store.claim_next(exclude_paging=False).id == a


def test_the_daemon_never_lifts_a_user_hold(loop):
    d, launcher, _ = loop(paging=False)
    paging = submit(d, "nightly_insights", archive="/a")
    d.tick()
    assert d.store.get(paging).hold_code == "paging_off"
    hold(d.store, [paging])                             # a paging hold becomes a user's
    assert d.store.get(paging).hold_code == USER_HOLD
    d.experimental_paging = True                                 # the paging hold lifts
    for _ in range(3):
        d.tick()
    run = d.store.get(paging)
    assert (run.state, run.hold_code) == (RunState.HELD, USER_HOLD)
    release(d.store, [paging])
    d.tick()
    assert d.store.get(paging).state is RunState.STARTING
    launcher.finish(paging, protocol.EXIT_OK, result="/r")
