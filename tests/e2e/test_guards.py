"""Guards and co-tenants with file sensors and real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXPERIMENTAL_PYTHON, ROOT, Lab, guard_lab, pid_alive, wait_for, write_config, write_sensors

pytestmark = pytest.mark.e2e
ENDED = {"succeeded", "failed", "cancelled", "timed_out", "oom", "lost", "killed_thermal"}
GUARD_INTERVAL_S, KILL_GRACE_S = 0.2, 1.0


@pytest.fixture
def glab(lab: Lab) -> Lab:
    g = guard_lab(lab.root)
    lab.config = g.config
    return lab


def _guard_events(lab: Lab) -> list[dict]:
    return json.loads(lab.cli("status", "--json").stdout)["guard_events"]


def test_thermal_alarm_kills_a_sigterm_deaf_paging_worker_and_holds_admissions(glab: Lab):
    lab, sensors = glab, glab.root / "sensors.json"
    lab.start_daemon("--experimental-paging")
    rid = lab.submit("paging_sleepy", "seconds=60", "ignore_sigterm=true")
    plain = lab.submit("sleepy", "seconds=60")
    run = lab.wait_state(rid, {"running"})
    wait_for(lambda: (Path(run["run_dir"]) / "output" / "worker.pid").exists(), what="job start")
    t0 = time.time()
    write_sensors(sensors, 91.0)
    run = lab.wait_state(rid, ENDED, timeout_s=20)
    assert run["state"] == "killed_thermal"
    assert "GPU 0 at 91 °C > 85 °C limit" in run["reason"] and "SIGKILL after grace" in run["reason"]
    # From the hot reading to the daemon's own end time (not to when `show` polling saw it): one guard
    # interval to notice, the grace before SIGKILL, and a second for the daemon's tick on a busy host.
    reaction_s = run["ended_at"] - t0
    assert reaction_s <= GUARD_INTERVAL_S + KILL_GRACE_S + 1.0, reaction_s
    assert not pid_alive(run["pid"])
    assert lab.state(plain) == "running"            # not a paging run: untouched
    # New paging runs wait while hot, and also between the limit and resume_below_c.
    nxt = lab.submit("paging_sleepy", "seconds=0.2")
    held = lab.wait_state(nxt, {"held"})
    assert "thermal cooldown" in held["reason"]
    write_sensors(sensors, 80.0)
    time.sleep(1.0)
    assert lab.state(nxt) == "held"
    write_sensors(sensors, 70.0)
    assert lab.wait_state(nxt, ENDED)["state"] == "succeeded"
    actions = [(e["guard"], e["action"]) for e in _guard_events(lab)]
    assert ("thermal", "kill") in actions and ("thermal", "hold") in actions
    assert ("thermal", "resume") in actions
    shown = lab.show(rid)
    assert [e["action"] for e in shown["guard_events"]] == ["kill"]
    print(f"thermal guard reaction: {reaction_s:.2f} s")


def test_rss_guard_kills_a_growing_worker_as_oom(tmp_path: Path, lab: Lab):
    g = guard_lab(tmp_path, guards='max_worker_rss_bytes = "150MiB"')
    lab.config = g.config
    lab.start_daemon()
    rid = lab.submit("hog", "target_rss_bytes=400MiB")
    run = lab.wait_state(rid, ENDED, timeout_s=30)
    assert run["state"] == "oom"
    assert "worker RSS" in run["reason"] and "150.0 MiB limit" in run["reason"]
    assert run["progress"]["done"] < 400
    assert not (Path(run["run_dir"]) / "output" / "reached").exists()


def test_sigkill_near_the_rss_limit_is_blamed_on_the_oom_killer(tmp_path: Path, lab: Lab):
    g = guard_lab(tmp_path, guards='max_worker_rss_bytes = "150MiB"')
    lab.config = g.config
    lab.start_daemon()
    rid = lab.submit("hog", "target_rss_bytes=142MiB")   # >= 90 % of the limit, not over
    run = lab.wait_state(rid, {"running"})
    wait_for(lambda: (Path(run["run_dir"]) / "output" / "reached").exists(), 30, "hog to grow")
    time.sleep(0.6)                                       # a guard poll sees it there
    os.kill(run["pid"], signal.SIGKILL)                   # as the kernel OOM killer would
    run = lab.wait_state(rid, ENDED)
    assert run["state"] == "oom" and "SIGKILL" in run["reason"], run["reason"]
    assert "likely killed by the kernel OOM killer" in run["reason"]


def test_vram_guard_kills_a_worker_over_its_gpu_budget(tmp_path: Path, lab: Lab):
    g = guard_lab(tmp_path, guards='vram_budget_bytes = "1GiB"\nvram_margin_bytes = "100MiB"')
    lab.config = g.config
    lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=60")
    run = lab.wait_state(rid, {"running"})
    write_sensors(tmp_path / "sensors.json", 60.0, {run["pid"]: 2 << 30})
    run = lab.wait_state(rid, ENDED)
    assert run["state"] == "oom" and "worker GPU memory 2.0 GiB > 1.0 GiB budget" in run["reason"]


def test_torch_out_of_memory_in_a_worker_ends_oom_with_the_bytes(tmp_path: Path):
    lab = Lab(tmp_path, write_config(tmp_path, python=EXPERIMENTAL_PYTHON))
    rid, host = lab.submit("torch_oom"), lab.submit("torch_host_oom")
    lab.cli("daemon", "--burst", timeout=120)
    run = lab.show(rid)
    assert run["state"] == "oom" and run["exit_code"] == 3
    assert run["reason"].startswith("out of GPU memory: requested 2.0 GiB; OutOfMemoryError")
    err = [e for e in run["events"] if e["kind"] == "error"][0]["reason"]
    assert err.startswith("OutOfMemoryError")
    run = lab.show(host)                          # a real allocator failure, not a raised type
    assert run["state"] == "oom" and run["exit_code"] == 3
    assert run["reason"].startswith("out of host memory: requested 1024.0 TiB; RuntimeError")


# -- EarNode --------------------------------------------------------------------------------------
def _earnode_lab(tmp_path: Path, lab: Lab, command_timeout_s: float = 10) -> Path:
    d = tmp_path / "earnode"
    d.mkdir()
    script = ROOT / "tests" / "fixtures" / "earnode.py"
    cot = (f'[cotenants.earnode]\nstop = ["{sys.executable}", "{script}", "stop", "{d}"]\n'
           f'start = ["{sys.executable}", "{script}", "start", "{d}"]\n'
           f'pid_file = "{d / "earnode.pid"}"\nrestore_delay_s = 0.5\nrelease_timeout_s = 5\n'
           f"retry_after_s = 1\ncommand_timeout_s = {command_timeout_s}\n")
    g = guard_lab(tmp_path, cotenant=cot)
    lab.config = g.config
    subprocess.run([sys.executable, str(script), "start", str(d)], check=True)
    return d


def _earnode_pid(d: Path) -> int | None:
    try:
        pid = int((d / "earnode.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


@pytest.fixture
def earnode_cleanup():
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        pid = _earnode_pid(d)
        if pid:
            os.kill(pid, signal.SIGKILL)


def test_earnode_is_stopped_before_a_paging_run_and_restored_after(tmp_path, lab, earnode_cleanup):
    d = _earnode_lab(tmp_path, lab)
    earnode_cleanup.append(d)
    before = _earnode_pid(d)
    assert before
    lab.start_daemon("--experimental-paging")
    rid = lab.submit("paging_sleepy", "seconds=1")
    run = lab.wait_state(rid, ENDED, timeout_s=30)
    assert run["state"] == "succeeded"
    stop_at = [float(l.split()[0]) for l in (d / "earnode.log").read_text().splitlines()
               if " stop " in l][0]
    assert stop_at < run["running_at"]            # stopped before the run started
    assert not pid_alive(before)
    transitions = [e["to"] for e in run["events"] if e["kind"] == "transition"]
    assert transitions[:3] == ["queued", "held", "queued"]   # waited for EarNode
    after = wait_for(lambda: _earnode_pid(d), 15, "EarNode restored")
    assert after != before
    actions = wait_for(lambda: (a := [(e["guard"], e["action"]) for e in _guard_events(lab)])
                       and ("cotenant:earnode", "restored") in a and a, 10,
                       f"restored event {_guard_events(lab)} {lab.daemon_output()[-2000:]}")
    assert ("cotenant:earnode", "suspended") in actions


def test_daemon_killed_while_earnode_is_suspended_restores_it_on_start(tmp_path, lab, earnode_cleanup):
    d = _earnode_lab(tmp_path, lab)
    earnode_cleanup.append(d)
    daemon = lab.start_daemon("--experimental-paging")
    rid = lab.submit("paging_sleepy", "seconds=60")
    lab.wait_state(rid, {"running"})
    assert _earnode_pid(d) is None
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    assert _earnode_pid(d) is None
    lab.start_daemon()                              # no paging flag: nothing to suspend for
    wait_for(lambda: _earnode_pid(d), 15, "EarNode restored by the new daemon")
    assert lab.wait_state(rid, ENDED)["state"] == "lost"


def test_a_slow_cotenant_start_after_a_failed_stop_does_not_block_the_loop(tmp_path, lab,
                                                                          earnode_cleanup):
    """The start after a failed stop is a phase of the loop, not a wait inside a tick: a plain
    run submitted meanwhile is admitted and finishes while the start command still runs."""
    d = _earnode_lab(tmp_path, lab, command_timeout_s=120)
    earnode_cleanup.append(d)
    (d / "fail-stop").write_text("")
    (d / "slow-start").write_text("100")           # under command_timeout_s; the gate opens it below
    lab.start_daemon("--experimental-paging")
    held = lab.submit("paging_sleepy", "seconds=0.2")
    wait_for(lambda: any(e["action"] == "stop_failed" for e in _guard_events(lab)), 15,
             "the failed stop")                     # recorded before the start is launched
    failed_at = time.time()
    plain = lab.submit("sleepy", "seconds=0.2")
    run = lab.wait_state(plain, ENDED, timeout_s=15)
    assert run["state"] == "succeeded"
    (d / "go").write_text("")                       # only now may the start finish
    starts = wait_for(lambda: [float(l.split()[0]) for l in
                               (d / "earnode.log").read_text().splitlines() if " start " in l
                               and float(l.split()[0]) > failed_at], 20, "the slow start to end")
    assert run["ended_at"] < starts[0]              # finished while the start still ran
    assert lab.show(held)["state"] == "held"


def test_earnode_that_will_not_stop_keeps_the_run_held_with_the_reason(tmp_path, lab, earnode_cleanup):
    d = _earnode_lab(tmp_path, lab)
    earnode_cleanup.append(d)
    (d / "fail-stop").write_text("")
    lab.start_daemon("--experimental-paging")
    rid = lab.submit("paging_sleepy", "seconds=0.2")
    run = wait_for(lambda: (r := lab.show(rid))["state"] == "held"
                   and "did not stop" in r["reason"] and r, 15, "held with the stop failure")
    assert "exit code 3" in run["reason"] and "refusing to stop" in run["reason"]
    assert _earnode_pid(d)                          # still serving
    (d / "fail-stop").unlink()                      # it gives in; the retry succeeds
    assert lab.wait_state(rid, ENDED, timeout_s=30)["state"] == "succeeded"
