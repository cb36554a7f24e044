"""Process faults with the real daemon, real workers (a trivial kind, not the model), real
signals and real SQLite; each scenario repeats and ends with check_invariant()."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from lab_attendant.store.db import Store
from tests.conftest import ROOT, Lab, write_config

from .conftest import check_invariant, pid_alive, report, rows, sensors_file, wait_for

pytestmark = pytest.mark.faults
DAEMON_KILLS, WORKER_KILLS, SENSOR_FAULTS, COTENANT_FAULTS = 20, 10, 3, 3
SUBMITTERS, SUBMITS_EACH = 20, 25           # 500 concurrent submits


def _submit(store: Store, kind: str = "sleepy", **params) -> int:
    return store.submit(kind=kind, params={"seconds": 30.0, "grandchild": False,
                                           "ignore_sigterm": False, "quiet": False, **params},
                        priority=0, timeout_s=120, needs_paging=kind.startswith("paging")).id


def test_daemon_sigkill_with_runs_in_flight(lab: Lab):
    """SIGKILL the daemon with two runs (each with a grandchild) in flight, DAEMON_KILLS times;
    every next daemon reconciles the previous one's runs to `lost` and kills their groups."""
    store = Store(lab.state_dir / "lab_attendant.sqlite3")
    ids: list[int] = []
    daemon = lab.start_daemon()
    for _ in range(DAEMON_KILLS):
        batch = [_submit(store, grandchild=True) for _ in range(2)]
        ids += batch
        wait_for(lambda: all(store.get(i).state.value == "running" for i in batch), 30,
                 "both runs running")
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        daemon = lab.start_daemon()
        wait_for(lambda: all(store.get(i).state.value == "lost" for i in batch), 30,
                 "the next daemon to reconcile them")
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    counts = check_invariant(lab, ids, allow_queued=False)
    assert counts == {"lost": 2 * DAEMON_KILLS}
    grandchildren = [int(p.read_text()) for p in lab.state_dir.glob("runs/*/output/grandchild.pid")]
    assert len(grandchildren) == 2 * DAEMON_KILLS
    orphans = [p for p in grandchildren if pid_alive(p)]
    assert not orphans
    report("daemon SIGKILL with 2 runs in flight", repeats=DAEMON_KILLS, runs=len(ids),
           reconciled_lost=counts["lost"], orphans=len(orphans), rows=len(rows(lab)))


def test_worker_sigkill(lab: Lab):
    store = Store(lab.state_dir / "lab_attendant.sqlite3")
    daemon = lab.start_daemon()
    ids = []
    for _ in range(WORKER_KILLS):
        rid = _submit(store, grandchild=True)
        ids.append(rid)
        pid_file = lab.state_dir / "runs" / str(rid) / "output" / "worker.pid"
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the worker")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        wait_for(lambda: store.get(rid).state.value == "failed", 30, "the run to fail")
        assert "SIGKILL" in store.get(rid).reason
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    counts = check_invariant(lab, ids, allow_queued=False)
    assert counts == {"failed": WORKER_KILLS}
    report("worker SIGKILL", repeats=WORKER_KILLS, failed_with_signal_named=counts["failed"],
           orphans=0, rows=len(rows(lab)))


@pytest.fixture
def sensor_lab(lab: Lab) -> Lab:
    sensors = lab.root / "sensors.json"
    sensors_file(sensors)
    cfg = write_config(lab.root, extra=f'sensors_lost_grace_s = 1.0\nsensors = "file:{sensors}"\n')
    cfg.write_text(cfg.read_text().replace('sensors = "none"\n', ""))
    return lab


def test_gpu_sensor_error(sensor_lab: Lab):
    """Sensors that answered start failing (as NVML does when the GPU falls off the bus): the
    running paging run is stopped after sensors_lost_grace_s, new paging runs are held, plain
    runs go on; once the sensors answer, the held run starts and succeeds."""
    lab = sensor_lab
    sensors = lab.root / "sensors.json"
    store = Store(lab.state_dir / "lab_attendant.sqlite3")
    daemon = lab.start_daemon("--experimental-paging")
    ids, stopped, resumed = [], 0, 0
    for i in range(SENSOR_FAULTS):
        running = _submit(store, "paging_sleepy")
        ids.append(running)
        wait_for(lambda: store.get(running).state.value == "running", 30, "paging run running")
        sensors.write_text("{ not json")                     # the sensors fail
        wait_for(lambda: sum(g.guard == "sensors" and g.action == "hold"
                             for g in store.guard_events(limit=500)) > i, 30, "the sensors hold")
        waiting = _submit(store, "paging_sleepy", seconds=0.2)
        plain = _submit(store, seconds=0.2)
        ids += [waiting, plain]
        wait_for(lambda: store.get(running).state.value == "failed", 30,
                 f"the blind stop ({store.get(running).state}: {store.get(running).reason}; {lab.daemon_output()[-1500:]})")
        stopped += "cannot be enforced" in store.get(running).reason
        wait_for(lambda: store.get(plain).state.value == "succeeded", 30, "the plain run")
        assert store.get(waiting).state.value == "held"
        sensors_file(sensors)                                # they answer again
        wait_for(lambda: store.get(waiting).state.value == "succeeded", 30, "the held run")
        resumed += 1
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    counts = check_invariant(lab, ids, allow_queued=False)
    assert stopped == SENSOR_FAULTS and counts == {"failed": SENSOR_FAULTS,
                                                   "succeeded": 2 * SENSOR_FAULTS}
    report("GPU sensors fail (file sensors via host.py)", repeats=SENSOR_FAULTS,
           paging_stopped=stopped, held_then_succeeded=resumed, plain_succeeded=SENSOR_FAULTS)


def test_cotenant_start_failure(lab: Lab):
    """EarNode's start fails after a paging run: the daemon records restore_failed, keeps
    running other runs, retries after retry_after_s and restores it once start works."""
    d = lab.root / "earnode"
    d.mkdir()
    script = ROOT / "tests" / "fixtures" / "earnode.py"
    write_config(lab.root, extra=(
        f'[cotenants.earnode]\nstop = ["{sys.executable}", "{script}", "stop", "{d}"]\n'
        f'start = ["{sys.executable}", "{script}", "start", "{d}"]\npid_file = "{d / "earnode.pid"}"\n'
        "restore_delay_s = 0.2\nrelease_timeout_s = 5\nretry_after_s = 0.5\ncommand_timeout_s = 10\n"))
    subprocess.run([sys.executable, str(script), "start", str(d)], check=True)
    store = Store(lab.state_dir / "lab_attendant.sqlite3")
    daemon = lab.start_daemon("--experimental-paging")
    ids, restored = [], 0
    try:
        for i in range(COTENANT_FAULTS):
            (d / "fail-start").write_text("")
            rid = _submit(store, "paging_sleepy", seconds=0.2)
            ids.append(rid)
            wait_for(lambda: store.get(rid).state.value == "succeeded", 30, "the paging run")
            wait_for(lambda: sum(g.action == "restore_failed" for g in store.guard_events(limit=500))
                     > i, 30, "a failed restore")
            plain = _submit(store, seconds=0.2)
            ids.append(plain)
            wait_for(lambda: store.get(plain).state.value == "succeeded", 30, "a plain run meanwhile")
            (d / "fail-start").unlink()
            wait_for(lambda: sum(g.action == "restored" for g in store.guard_events(limit=500))
                     > i, 30, "the retried restore")
            restored += 1
            assert not store.cotenants()[0].suspended
    finally:
        pid = (d / "earnode.pid").read_text() if (d / "earnode.pid").exists() else ""
        daemon.terminate()
        daemon.wait(timeout=30)
        if pid and pid_alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)
    counts = check_invariant(lab, ids, allow_queued=False)
    assert counts == {"succeeded": 2 * COTENANT_FAULTS} and restored == COTENANT_FAULTS
    report("co-tenant start failure", repeats=COTENANT_FAULTS, restore_failed_then_restored=restored,
           runs_succeeded=counts["succeeded"])


SUBMITTER = """
import contextlib, io, json, sys
from lab_attendant.cli.main import main
ids = []
for _ in range({n}):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", sys.argv[1], "submit", "paging_echo", "--json"])
    assert code == 0, code
    ids.append(json.loads(out.getvalue())["id"])
print(json.dumps(ids))
"""


def test_500_concurrent_submits(lab: Lab):
    """SUBMITTERS processes submit SUBMITS_EACH runs each through the CLI at once, while a daemon
    (paging off: they wait as `held`) reads and writes the same store."""
    daemon = lab.start_daemon()
    procs = [subprocess.Popen([sys.executable, "-c", SUBMITTER.format(n=SUBMITS_EACH),
                               str(lab.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=lab.env(), cwd=lab.root) for _ in range(SUBMITTERS)]
    ids, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            errors.append(err[-500:])
        else:
            ids += json.loads(out)
    assert not errors, errors[0]
    assert len(ids) == len(set(ids)) == SUBMITTERS * SUBMITS_EACH
    wait_for(lambda: all(r[1] == "held" for r in rows(lab)), 60, "the daemon to hold them all")
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    found = rows(lab)
    assert sorted(r[0] for r in found) == sorted(ids)
    assert "database is locked" not in lab.daemon_output()
    report("500 concurrent submits (20 processes x 25)", submits=len(ids), rows=len(found),
           duplicates=len(ids) - len(set(ids)), locked_errors=0)
