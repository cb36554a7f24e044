"""The `command` kind against the real daemon: the user's own program as a run (no shell), its output in
the run log, its exit code deciding the state, the environment allow-list, and a `--gpu` command killed
by the thermal guard like any paging worker."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import Lab, guard_lab, pid_alive, wait_for, write_sensors

pytestmark = pytest.mark.e2e
ENDED = {"succeeded", "failed", "cancelled", "timed_out", "oom", "lost", "killed_thermal"}


def _submit_command(lab: Lab, *argv: str, extra: tuple[str, ...] = ()) -> int:
    return json.loads(lab.cli("submit", "command", "--json", *extra, "--", *argv).stdout)["id"]


def test_a_command_run_logs_its_output_and_sees_only_allowed_variables(lab: Lab, monkeypatch):
    monkeypatch.setenv("LAB_SECRET_TOKEN", "s3cr3t")          # the daemon inherits it; the program must not
    lab.start_daemon()
    script = ("import os, sys; print('hello from', os.getcwd()); "
              "print('secret', os.environ.get('LAB_SECRET_TOKEN')); "
              "print('run', os.environ['LAB_ATTENDANT_RUN_ID']); print('semi;colon $HOME', sys.argv[1:])")
    rid = _submit_command(lab, sys.executable, "-c", script, "a b", "$(touch /tmp/x)")
    run = lab.wait_state(rid, ENDED)
    assert run["state"] == "succeeded", run["reason"]
    log = lab.cli("logs", str(rid)).stdout
    out_dir = Path(run["run_dir"]) / "output"
    assert f"hello from {out_dir}" in log                   # default cwd: the run's output folder
    assert "secret None" in log and f"run {rid}" in log
    assert "['a b', '$(touch /tmp/x)']" in log              # argv reached it as typed: no shell
    assert run["params"]["argv"][0] == sys.executable
    assert json.loads((out_dir / "result.json").read_text())["exit_code"] == 0


def test_a_failing_command_fails_the_run_with_its_exit_code(lab: Lab):
    lab.start_daemon()
    rid = _submit_command(lab, sys.executable, "-c", "import sys; print('oops', file=sys.stderr); sys.exit(3)")
    run = lab.wait_state(rid, ENDED)
    assert run["state"] == "failed"
    assert "exited with code 3" in run["reason"]
    log = lab.cli("logs", str(rid)).stdout
    assert "oops" in log and "Traceback" not in log
    assert run["metrics"]["exit_code"] == 3
    assert run["exit_code"] == 3     # the program's code, not the worker's 1
    assert lab.cli("list", "--format", "id,exit").stdout.split()[-1] == "3"


def test_a_command_is_refused_at_submit_with_a_sentence(lab: Lab, tmp_path: Path):
    bad = lab.cli("submit", "command", "--", "no-such-program-xyz", check=False)
    assert bad.returncode != 0 and "is not on your PATH; give its full path" in bad.stderr
    outside = lab.cli("submit", "command", "--cwd", "/etc", "--", "true", check=False)
    assert outside.returncode != 0 and "outside the allowed roots" in outside.stderr
    other = lab.cli("submit", "probe", "--", "true", check=False)
    assert other.returncode != 0 and "takes no program after `--`" in other.stderr
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    notexec = lab.cli("submit", "command", "--", str(script), check=False)
    assert notexec.returncode != 0 and "not an executable file" in notexec.stderr
    assert json.loads(lab.cli("list", "--json").stdout) == []          # nothing was queued


def test_a_gpu_command_waits_for_paging_and_is_killed_by_the_thermal_guard(tmp_path: Path, lab: Lab):
    g = guard_lab(tmp_path)
    lab.config = g.config
    sensors = tmp_path / "sensors.json"
    work = tmp_path / "work"
    work.mkdir()
    marker = work / "child.pid"                 # its cwd is writable to it, the sandbox allowing
    # A program that ignores SIGTERM and starts a grandchild: both must be gone after the kill.
    script = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    first = lab.start_daemon()                                     # no --experimental-paging yet
    rid = _submit_command(lab, sys.executable, "-c", script, extra=("--gpu", "--cwd", str(work)))
    held = lab.wait_state(rid, {"held"})
    assert "--experimental-paging" in held["reason"]
    first.send_signal(signal.SIGTERM)
    first.wait(20)
    lab.start_daemon("--experimental-paging")
    run = lab.wait_state(rid, {"running"})
    child = int(wait_for(lambda: marker.exists() and marker.read_text(), 20, "the grandchild"))
    write_sensors(sensors, 91.0)
    run = lab.wait_state(rid, ENDED, timeout_s=20)
    assert run["state"] == "killed_thermal"
    assert "GPU 0 at 91 °C" in run["reason"]
    wait_for(lambda: not pid_alive(child) and not pid_alive(run["pid"]), 10, "the program's group to die")


def test_update_of_gpu_makes_a_waiting_command_a_paging_run(lab: Lab):
    rid = _submit_command(lab, "true")
    assert lab.show(rid)["needs_paging"] is False
    out = lab.cli("update", str(rid), "-p", "gpu=true").stdout
    assert "a GPU run (waits for --experimental-paging)" in out
    assert lab.show(rid)["needs_paging"] is True
