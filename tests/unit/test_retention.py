"""[retention]: the daemon's loop prunes ended runs past the age (rows, folder, log) once per
interval, keeps failed ones when asked, and does nothing by default; orphans are swept."""
from __future__ import annotations

import time

from lab_attendant.cli.prune import run_folders
from lab_attendant.store.prune import prune
from lab_attendant.store.states import RunState


def _ended(d, state: RunState, age_days: float) -> int:
    rid = d.store.submit(kind="probe", params={}, priority=0, timeout_s=60,
                         needs_paging=False).id
    d.store.transition(rid, RunState.STARTING, "claimed")
    d.store.transition(rid, state, "seeded")
    d.store.update_run(rid, ended_at=time.time() - age_days * 86400)
    (d.cfg.runs_dir / str(rid) / "output").mkdir(parents=True)
    log = d.cfg.paths.logs_dir / "runs" / f"{rid}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("line\n")
    return rid


def test_the_daemon_prunes_old_runs_once_per_interval(loop):
    d, _, _ = loop(retention={"older_than_days": 7, "keep_failed": True})
    old_ok, old_failed = _ended(d, RunState.SUCCEEDED, 8), _ended(d, RunState.FAILED, 8)
    recent = _ended(d, RunState.SUCCEEDED, 1)
    d.tick()
    assert d.store.get(old_ok) is None and not (d.cfg.runs_dir / str(old_ok)).exists()
    assert not (d.cfg.paths.logs_dir / "runs" / f"{old_ok}.log").exists()
    assert d.store.get(old_failed) is not None and d.store.get(recent) is not None
    later_old = _ended(d, RunState.SUCCEEDED, 30)
    d.tick()                                        # the interval (a day) has not passed
    assert d.store.get(later_old) is not None


def test_retention_is_off_by_default_and_prune_sweeps_orphans(loop):
    d, _, _ = loop()
    old = _ended(d, RunState.SUCCEEDED, 400)
    orphan = d.cfg.runs_dir / "9999"
    orphan.mkdir(parents=True)
    d.tick()
    assert d.store.get(old) is not None
    out = prune(d.store, run_folders(d.cfg), older_than_s=500 * 86400, keep_failed=False)
    assert out.runs == [] and out.paths == [orphan] and not orphan.exists()
