"""Real daemon, real worker subprocesses, real SQLite: the life of a run and its failure modes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXPERIMENTAL_PYTHON, Lab, pid_alive, wait_for, write_config

pytestmark = pytest.mark.e2e
ENDED = {"succeeded", "failed", "cancelled", "timed_out", "oom", "lost", "killed_thermal"}


def _transitions(run: dict) -> list[tuple[str | None, str]]:
    return [(e["from"], e["to"]) for e in run["events"] if e["kind"] == "transition"]


def test_probe_runs_in_the_experimental_venv_and_succeeds(tmp_path: Path):
    assert EXPERIMENTAL_PYTHON.exists(), (
        f"{EXPERIMENTAL_PYTHON} missing: run scripts/test.sh (it creates venvs/experimental)")
    lab = Lab(tmp_path, write_config(tmp_path, python=EXPERIMENTAL_PYTHON))
    data = tmp_path / "blob.bin"
    data.write_bytes(os.urandom(4 * 1024**2))
    rid = lab.submit("probe", f"path={data}")
    proc = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(lab.config),
                           "daemon", "--burst"], env=lab.env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = lab.show(rid)
    assert run["state"] == "succeeded", run["reason"]
    assert _transitions(run) == [(None, "queued"), ("queued", "starting"),
                                 ("starting", "running"), ("running", "succeeded")]
    result = json.loads(Path(run["result_path"]).read_text())
    assert result["torch"] and result["torch"].startswith("2.")
    assert result["read_bandwidth"]["bytes_read"] == 4 * 1024**2
    assert run["progress"] == {"done": 4, "total": 4, "unit": "MiB", "phase": None}   # MiB read, not bytes
    assert result["read_bandwidth"]["bytes_per_s"] > 0
    assert result["cuda"]["available"] in (True, False)
    # Atomic writes leave no temp files behind.
    assert not [p for p in Path(run["run_dir"]).rglob(".*.tmp.*")]


def test_worker_sigkilled_midrun_fails_and_its_grandchild_dies(lab: Lab):
    daemon = lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=60", "grandchild=true")
    run = lab.wait_state(rid, {"running"})
    out = Path(run["run_dir"]) / "output"
    gpid = int(wait_for(lambda: (out / "grandchild.pid").exists() and
                        (out / "grandchild.pid").read_text(), what="grandchild pid"))
    assert pid_alive(gpid)
    os.kill(run["pid"], signal.SIGKILL)
    run = lab.wait_state(rid, ENDED)
    assert run["state"] == "failed"
    assert "SIGKILL" in run["reason"] and run["signal"] == "SIGKILL"
    wait_for(lambda: not pid_alive(gpid), 10, "grandchild to be killed")
    assert daemon.poll() is None


def test_cancel_of_a_worker_that_ignores_sigterm_kills_it_after_grace(lab: Lab):
    lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=60", "ignore_sigterm=true")
    run = lab.wait_state(rid, {"running"})
    wait_for(lambda: (Path(run["run_dir"]) / "output" / "worker.pid").exists(), what="job start")
    t0 = time.monotonic()
    assert "daemon will stop it" in lab.cli("cancel", str(rid)).stdout
    run = lab.wait_state(rid, ENDED)
    elapsed = time.monotonic() - t0
    assert run["state"] == "cancelled"
    assert "SIGKILL after grace" in run["reason"]
    assert elapsed >= 1.0            # kill_grace_s = 1.0 in the test config
    assert not pid_alive(run["pid"])


def test_cancel_of_a_queued_run_needs_no_daemon(lab: Lab):
    rid = lab.submit("sleepy")
    lab.cli("cancel", str(rid))
    run = lab.show(rid)
    assert run["state"] == "cancelled" and run["pid"] is None


def test_timeout_ends_timed_out(lab: Lab):
    lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=60", extra=("--timeout", "1.5"))
    run = lab.wait_state(rid, ENDED)
    assert run["state"] == "timed_out"
    assert "timed out after 1.5 s" in run["reason"]


def test_errors_and_oom_are_classified(lab: Lab):
    lab.start_daemon()
    crash, oom = lab.submit("crash"), lab.submit("fake_oom")
    crash_run = lab.wait_state(crash, ENDED)
    oom_run = lab.wait_state(oom, ENDED)
    assert crash_run["state"] == "failed"
    assert "ValueError: fixture crash" in crash_run["reason"] and crash_run["exit_code"] == 1
    assert oom_run["state"] == "oom" and "could not allocate 1 GiB" in oom_run["reason"]
    assert "Traceback" in lab.cli("logs", str(crash)).stdout


def _two_runs_then_kill_daemon(lab: Lab, *params: str):
    daemon = lab.start_daemon()
    rids = [lab.submit("sleepy", "seconds=60", "grandchild=true", *params) for _ in range(2)]
    runs = [lab.wait_state(r, {"running"}) for r in rids]
    gpids = []
    for run in runs:
        p = Path(run["run_dir"]) / "output" / "grandchild.pid"
        gpids.append(int(wait_for(lambda: p.exists() and p.read_text(), what="grandchild")))
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    return rids, [r["pid"] for r in runs] + gpids


def test_daemon_sigkilled_with_two_live_runs_kills_them_on_restart(tmp_path: Path):
    # Quiet workers with a slow heartbeat do not notice the daemon's death before the restart.
    lab = Lab(tmp_path, write_config(tmp_path, heartbeat_s=600))
    try:
        rids, pids = _two_runs_then_kill_daemon(lab, "quiet=true")
        assert all(pid_alive(p) for p in pids)      # orphans, until the next daemon starts
        lab.start_daemon()
        for rid in rids:
            run = lab.wait_state(rid, ENDED)
            assert run["state"] == "lost"
            assert "was still running and was killed" in run["reason"]
        for pid in pids:
            wait_for(lambda: not pid_alive(pid), 10, f"pid {pid} to die")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["pkill", "-KILL", "-f", str(lab.config)], check=False)


def test_workers_stop_when_their_daemon_dies_and_restart_marks_them_lost(lab: Lab):
    rids, pids = _two_runs_then_kill_daemon(lab)
    worker_pids = pids[:2]
    # The broken event pipe makes each worker stop by itself (heartbeat every 1 s here).
    for pid in worker_pids:
        wait_for(lambda: not pid_alive(pid), 15, f"worker {pid} to notice")
    lab.start_daemon()
    for rid in rids:
        run = lab.wait_state(rid, ENDED)
        assert run["state"] == "lost" and run["reason"].startswith("daemon restarted")
    for pid in pids:      # grandchildren included: their group is killed on reconcile
        wait_for(lambda: not pid_alive(pid), 10, f"pid {pid} to die")


def test_warm_shutdown_lets_a_short_run_finish(lab: Lab):
    daemon = lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=1.5")
    queued_after = None
    lab.wait_state(rid, {"running"})
    daemon.send_signal(signal.SIGTERM)
    queued_after = lab.submit("sleepy", "seconds=0.1")   # must not be admitted any more
    assert daemon.wait(20) == 0
    assert lab.state(rid) == "succeeded"
    assert lab.state(queued_after) == "queued"


def test_cold_shutdown_requeues_the_running_run(lab: Lab):
    daemon = lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=60")
    run = lab.wait_state(rid, {"running"})
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    after = lab.show(rid)
    assert after["state"] == "queued" and "requeued: daemon stopped (cold shutdown)" in after["reason"]
    assert not pid_alive(run["pid"])


def test_second_daemon_on_the_same_state_dir_is_refused(lab: Lab):
    lab.start_daemon()
    wait_for(lambda: json.loads(lab.cli("status", "--json").stdout)["daemon"]["alive"],
             what="daemon up")
    proc = lab.cli("daemon", check=False, timeout=20)
    assert proc.returncode == 2 and "another daemon" in proc.stderr


def test_status_reports_daemon_flag_queue_and_running(lab: Lab):
    st = json.loads(lab.cli("status", "--json").stdout)
    assert st["daemon"]["alive"] is False
    lab.start_daemon("--experimental-paging")
    rid = lab.submit("sleepy", "seconds=30")
    lab.wait_state(rid, {"running"})
    lab.submit("sleepy", "seconds=30", extra=("--priority", "-1"))
    lab.submit("sleepy", "seconds=30", extra=("--priority", "-1"))  # max_concurrent = 2
    def seen():
        s = json.loads(lab.cli("status", "--json").stdout)
        return s if len(s["running"]) == 2 and s["queue_depth"] == 1 else None
    st = wait_for(seen, what="2 running, 1 queued")
    assert st["daemon"]["alive"] and st["daemon"]["experimental_paging"] is True
    assert rid in [r["id"] for r in st["running"]]


def test_venv_check_reports_the_worker_venv(tmp_path: Path):
    lab = Lab(tmp_path, write_config(tmp_path, python=EXPERIMENTAL_PYTHON))
    info = json.loads(lab.cli("venv", "check").stdout)
    assert info["torch"].startswith("2.") and info["transformers"]
    assert info["cuda_available"] in (True, False)
    missing = Lab(tmp_path, write_config(tmp_path, python=tmp_path / "nope" / "bin" / "python"))
    proc = missing.cli("venv", "check", check=False)
    assert proc.returncode == 2 and "lab-attendant venv create" in proc.stderr
