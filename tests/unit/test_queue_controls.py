"""afterany/afternotok/singleton, `update`, bulk selection, pause and `parallel` on a real SQLite
store, and the daemon's loop (fake host) admitting nothing while paused and at most N after
`parallel N`; per-run notify's ends."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from lab_attendant.daemon.notify import FAIL_ENDS, PER_RUN_ENDS
from lab_attendant.errors import UserError
from lab_attendant.store import queue
from lab_attendant.store.db import Store
from lab_attendant.store.deps import cancel_unsatisfiable, check_after, waiting_for
from lab_attendant.store.lifecycle import AFTER_ANY, AFTER_NOTOK
from lab_attendant.store.states import ACTIVE, RunState
from tests.unit.fakes import submit


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def _run(store: Store, **kw) -> int:
    return store.submit(kind="sleepy", params={"seconds": 1}, priority=0, timeout_s=60,
                        needs_paging=False, **kw).id


def _end(store: Store, rid: int, state: RunState) -> None:
    store.transition(rid, RunState.STARTING, "claimed")
    store.transition(rid, state, "done")


def test_afterany_waits_for_an_end_and_afternotok_for_a_failure(store: Store):
    a, b = _run(store), _run(store)
    anyway = _run(store, after_any=[a])
    on_fail = _run(store, after_notok=[a])
    never = _run(store, after_notok=[b])
    assert waiting_for(store, [store.get(anyway)])[anyway] == "waiting for run 1 to end (queued)"
    assert waiting_for(store, [store.get(on_fail)])[on_fail] == "waiting for run 1 to fail (queued)"
    _end(store, a, RunState.FAILED)
    _end(store, b, RunState.SUCCEEDED)
    assert cancel_unsatisfiable(store) == [never]
    assert store.get(never).reason == ("dependency can never be met, not started: run 2 "
                                       "succeeded: afternotok can never be met")
    claimed = {store.claim_next(exclude_paging=False).id for _ in range(2)}
    assert claimed == {anyway, on_fail}
    assert store.claim_next(exclude_paging=False) is None


def test_a_cancelled_parent_meets_afternotok_and_a_succeeded_one_is_refused_at_submit(store: Store):
    a, b = _run(store), _run(store)
    child = _run(store, after_notok=[a])
    store.request_cancel(a)
    assert cancel_unsatisfiable(store) == []
    assert store.claim_next(exclude_paging=False).id == b      # b first: it is older
    assert store.claim_next(exclude_paging=False).id == child
    store.transition(b, RunState.SUCCEEDED, "ok")
    with pytest.raises(UserError, match="would never start"):
        check_after(store, [b], AFTER_NOTOK)
    assert check_after(store, [b], AFTER_ANY) == [b]


def test_singleton_blocks_while_a_run_of_its_name_is_active(store: Store):
    first = _run(store, name="solo", singleton=True)
    second = _run(store, name="solo", singleton=True)
    other = _run(store, name="other", singleton=True)
    assert store.claim_next(exclude_paging=False).id == first
    assert store.claim_next(exclude_paging=False).id == other
    assert store.claim_next(exclude_paging=False) is None
    assert waiting_for(store, [store.get(second)])[second] == \
        f"singleton: run {first} named 'solo' is starting"
    store.transition(first, RunState.SUCCEEDED, "ok")
    assert store.claim_next(exclude_paging=False).id == second


def test_edit_changes_only_a_waiting_run_and_logs_what_changed(store: Store):
    rid = _run(store)
    assert queue.edit(store, rid, priority=4, timeout_s=30.0) == ["priority", "timeout_s"]
    assert queue.edit(store, rid, priority=4) == []
    run = store.get(rid)
    assert (run.priority, run.timeout_s) == (4, 30.0)
    assert [e.reason for e in store.events(rid) if e.kind == "update"] == [
        "updated by user: priority 0 -> 4; timeout_s 60.0 -> 30.0"]
    store.claim_next(exclude_paging=False)
    with pytest.raises(UserError, match="only a waiting run"):
        queue.edit(store, rid, priority=1)
    assert store.get(rid).priority == 4


def test_select_runs_filters_by_name_state_kind_and_what_the_verb_acts_on(store: Store):
    a = _run(store, name="batch-1")
    b = _run(store, name="batch-2")
    c = _run(store, name="keep")
    _end(store, b, RunState.SUCCEEDED)
    got = queue.select_runs(store, name="batch-*", acts_on=queue.is_cancellable)
    assert [r.id for r in got] == [a]                       # b has ended: nothing to cancel
    got = queue.select_runs(store, states=[RunState.QUEUED], acts_on=queue.is_holdable)
    assert [r.id for r in got] == [a, c]
    got = queue.select_runs(store, ids=[a, b, c], kind="sleepy", acts_on=queue.is_releasable)
    assert got == []
    with pytest.raises(UserError, match="no run 99"):   # bare ids are checked, as before
        queue.select_runs(store, ids=[a, 99], acts_on=queue.is_cancellable)


def test_pause_keeps_its_first_time_and_parallel_is_range_checked(store: Store):
    assert queue.controls(store) == queue.Controls()
    changed, now = queue.pause(store)
    assert changed and now.paused_since is not None
    again, later = queue.pause(store)
    assert not again and later.paused_since == now.paused_since
    assert queue.resume(store)[0] and not queue.resume(store)[0]
    for bad in (0, -1, queue.MAX_PARALLEL + 1):
        with pytest.raises(UserError, match="parallel must be"):
            queue.set_parallel(store, bad)
    assert queue.set_parallel(store, 3).parallel(1) == 3
    assert queue.set_parallel(store, None).parallel(1) == 1


def test_the_loop_admits_nothing_while_paused_and_at_most_parallel_n(loop):
    d, launcher, _ = loop(paging=False, limits={"max_concurrent": 1})
    ids = [submit(d, "probe") for _ in range(3)]
    queue.pause(d.store)
    d.tick()
    assert {d.store.get(r).state for r in ids} == {RunState.QUEUED}
    d.burst = True                                    # --burst ends rather than wait on resume
    assert d.should_exit()
    d.burst = False
    queue.set_parallel(d.store, 2)
    queue.resume(d.store)
    d.tick()
    assert len(d.store.list_runs(states=ACTIVE)) == 2
    queue.set_parallel(d.store, None)                 # back to the config's 1: no third run
    d.tick()
    assert len(d.store.list_runs(states=ACTIVE)) == 2


def test_per_run_notify_ends():
    assert "succeeded" in PER_RUN_ENDS["end"] and "cancelled" in PER_RUN_ENDS["end"]
    assert PER_RUN_ENDS["fail"] == FAIL_ENDS
    assert {"failed", "oom", "killed_thermal", "timed_out", "lost"} == FAIL_ENDS


def test_a_paused_queue_does_not_suspend_the_cotenant_for_paging_runs_it_will_not_start(loop):
    d, _, _ = loop(paging=True, cotenants={"earnode": {"stop": ["stop-it"], "start": ["start-it"]}})
    launched: list[tuple[str, ...]] = []

    class Running:                                # a stop command that has not finished yet
        def poll(self) -> None:
            return None

        def kill(self) -> None:                   # at close, the daemon gives up on it
            pass

        def wait(self) -> int:
            return -9

    def start_command(argv, env=None):
        launched.append(tuple(argv))
        return Running(), tempfile.TemporaryFile()
    d.host.start_command = start_command
    queue.pause(d.store)
    paging = submit(d, "nightly_insights", archive="/a")
    for _ in range(3):
        d.host.advance(1.5)                      # past guard_interval_s each time
        d.tick()
    assert launched == [] and [c.phase for c in d.cotenants.items] == ["running"]
    assert d.store.get(paging).state is RunState.QUEUED   # not "held: waiting for the co-tenant"
    queue.resume(d.store)
    d.host.advance(1.5)
    d.tick()
    assert launched == [("stop-it",)]
    assert d.store.get(paging).hold_code == "cotenant:earnode"
