"""A neighbour on the same machine (issue #31, items 4-6): another local uid (nobody, through
setpriv) tries to read the state, hold the daemon's lock, or plant a config. Needs root."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import Lab, write_config

pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                 reason="needs root and setpriv to act as a second local user")]
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"     # stdlib only: nobody cannot reach our venv


def as_nobody(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*AS_NOBODY, SYSTEM_PYTHON, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture
def open_dir():
    """A world-traversable folder (pytest's own tmp is 0700, which would hide everything from
    nobody whatever we did), used under the usual umask 022."""
    root = Path(tempfile.mkdtemp(prefix="lab-open-", dir="/tmp"))
    root.chmod(0o755)
    old = os.umask(0o022)
    try:
        yield root
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def open_lab(open_dir: Path):
    return Lab(root=open_dir, config=write_config(open_dir))


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.lstat().st_mode)
            for p in [folder, *folder.rglob("*")]}


def test_state_logs_and_outputs_are_private_under_umask_022(open_lab: Lab):
    rid = open_lab.submit("sleepy", "seconds=0.2")
    daemon = open_lab.start_daemon("--burst")
    assert daemon.wait(timeout=60) == 0, open_lab.daemon_output()
    assert open_lab.state(rid) == "succeeded"
    open_lab.cli("db", "backup", str(open_lab.state_dir / "backups") + "/")
    modes = {**{f"var/{k}": v for k, v in _modes(open_lab.state_dir).items()},
             **{f"logs/{k}": v for k, v in _modes(open_lab.logs_dir).items()}}
    readable = {k: oct(v) for k, v in modes.items() if v & 0o077}
    assert not readable, f"readable by group/others: {readable}"
    assert modes["var/."] == modes["logs/."] == 0o700
    assert modes[f"var/runs/{rid}/spec.json"] == 0o600
    assert modes[f"var/runs/{rid}/output/worker.pid"] == 0o600   # the worker's own files too
    assert modes["var/daemon.lock"] == 0o600
    spy = as_nobody(f"print(open({str(open_lab.state_dir / 'lab_attendant.sqlite3')!r}, 'rb')"
                    f".read(16))")
    out, _ = spy.communicate(timeout=30)
    assert spy.returncode != 0 and "PermissionError" in out


def test_folders_an_older_version_left_0755_are_closed_at_the_next_start(open_lab: Lab):
    open_lab.state_dir.mkdir(mode=0o755)
    open_lab.logs_dir.mkdir(mode=0o755)
    (open_lab.state_dir / "daemon.lock").touch(mode=0o644)
    open_lab.cli("list")
    assert stat.S_IMODE(open_lab.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(open_lab.logs_dir.stat().st_mode) == 0o700


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(120)
"""


def test_another_user_cannot_take_the_lock_of_a_0600_file(open_lab: Lab):
    open_lab.cli("status")                              # creates nothing but closes the folders
    daemon = open_lab.start_daemon()
    lock = open_lab.state_dir / "daemon.lock"
    deadline = time.monotonic() + 30
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    daemon.terminate()
    assert daemon.wait(timeout=30) == 0
    lock.parent.chmod(0o755)                           # even with the folder open again
    spy = subprocess.run([*AS_NOBODY, SYSTEM_PYTHON, "-c", HOLD_LOCK, str(lock)],
                         capture_output=True, text=True, timeout=30)
    assert spy.returncode != 0 and "PermissionError" in spy.stderr


def test_a_lock_held_by_another_user_is_named_by_daemon_and_status(open_lab: Lab):
    """The 0644 lock an older version left, opened by nobody before we could close it: the
    daemon refuses with a sentence naming the user, and `status` agrees (not "not running"
    alone while a daemon cannot start)."""
    open_lab.state_dir.mkdir(mode=0o755)
    lock = open_lab.state_dir / "daemon.lock"
    lock.touch(mode=0o644)
    holder = subprocess.Popen([*AS_NOBODY, SYSTEM_PYTHON, "-c", HOLD_LOCK, str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = open_lab.cli("daemon", "--burst", check=False, timeout=60)
        assert proc.returncode == 2
        assert "locked by pid" in proc.stderr and "user nobody" in proc.stderr
        assert "not a daemon of this user" in proc.stderr
        status = open_lab.cli("status").stdout
        assert "daemon: not running" in status
        assert "LOCK HELD BY ANOTHER USER" in status and "nobody" in status
    finally:
        holder.kill()
        holder.wait()
    assert open_lab.cli("daemon", "--burst").returncode == 0     # let go: the daemon starts


PLANTED = """
[worker]
python = "/tmp/planted-python"
"""


def _run_cli_in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LAB_ATTENDANT_CONFIG"}
    return subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", *args], cwd=folder,
                          capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(Path(__file__).parents[2])})


def test_a_config_planted_by_another_user_in_a_shared_folder_is_refused(open_dir: Path):
    tmp_path = open_dir
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    planted = shared / "lab-attendant.toml"
    subprocess.run([*AS_NOBODY, "sh", "-c", f"umask 022; cat > {planted}"], input=PLANTED,
                   text=True, check=True)
    assert planted.stat().st_uid == NOBODY
    proc = _run_cli_in(shared, "list")
    assert proc.returncode == 2
    assert f"config file {planted} belongs to nobody, not to you or root" in proc.stderr
    assert "Traceback" not in proc.stderr
    for how in (["--config", str(planted)], ):      # an explicit path is checked the same way
        assert "belongs to nobody" in _run_cli_in(tmp_path, *how, "list").stderr
    env_proc = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "list"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "LAB_ATTENDANT_CONFIG": str(planted),
                                   "PYTHONPATH": str(Path(__file__).parents[2])})
    assert "belongs to nobody" in env_proc.stderr


def test_a_config_others_can_write_is_refused_and_our_own_is_read(tmp_path: Path):
    cfg = write_config(tmp_path)
    cfg.chmod(0o666)
    proc = _run_cli_in(tmp_path, "list")
    assert proc.returncode == 2 and "can be changed by other users (mode 666)" in proc.stderr
    assert f"chmod go-w {cfg}" in proc.stderr
    cfg.chmod(0o644)
    assert _run_cli_in(tmp_path, "list").returncode == 0


def test_a_model_registry_others_can_write_is_refused(tmp_path: Path):
    write_config(tmp_path)
    registry = tmp_path / "var" / "models.toml"
    registry.parent.mkdir()
    registry.write_text('[models.tiny]\npath = "/tmp/x"\n')
    registry.chmod(0o646)
    proc = _run_cli_in(tmp_path, "model", "list")
    assert proc.returncode == 2 and f"model registry {registry} can be changed" in proc.stderr
    os.chown(registry, NOBODY, NOBODY)
    registry.chmod(0o600)
    proc = _run_cli_in(tmp_path, "model", "list")
    assert proc.returncode == 2 and "belongs to nobody" in proc.stderr


def test_sudo_reads_the_config_of_the_user_who_ran_it(tmp_path: Path):
    """`sudo lab-attendant service install` with the caller's own config: the caller could run
    anything as root already, so their file is trusted; another user's is not."""
    cfg = write_config(tmp_path)
    os.chown(cfg, NOBODY, NOBODY)
    env = {k: v for k, v in os.environ.items() if k != "LAB_ATTENDANT_CONFIG"}
    run = [sys.executable, "-m", "lab_attendant.cli.main", "--config", str(cfg), "list"]
    ok = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                        env={**env, "SUDO_UID": str(NOBODY), "PYTHONPATH": str(Path(__file__).parents[2])})
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={**env, "SUDO_UID": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
    assert refused.returncode == 2 and "belongs to nobody" in refused.stderr
