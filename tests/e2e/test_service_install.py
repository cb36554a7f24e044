"""`lab-attendant service install/uninstall` as a user runs them, `systemd-analyze verify` on what
they render, and log rotation done by a real daemon."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab_attendant.cli import service
from lab_attendant.config import load_config
from tests.conftest import Lab

pytestmark = pytest.mark.e2e
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A temp HOME for the CLI subprocesses (Lab.env copies os.environ)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return tmp_path / "home"


def test_print_shows_absolute_paths_and_writes_nothing(lab: Lab, home: Path):
    out = lab.cli("service", "install", "--print", "--experimental-paging").stdout
    exec_starts = [ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("ExecStart=")]
    assert exec_starts[0].endswith(f"--config {lab.config} daemon")
    assert exec_starts[-1].endswith(f"--config {lab.config} daemon --experimental-paging")
    script = Path(exec_starts[0].split()[0])
    assert script.is_absolute() and os.access(script, os.X_OK)
    assert f"WorkingDirectory={lab.root}\n" in out
    assert f"ReadWritePaths={lab.state_dir} {lab.logs_dir}\n" in out
    assert f"ReadOnlyPaths={lab.root / 'models'}\n" in out
    assert "TimeoutStopSec=21s\n" in out                    # lab config: 5 + 1 + 15 margin
    assert not home.exists() and not (lab.root / "models").exists()


def test_user_install_writes_unit_and_dropin_uninstall_removes_them(lab: Lab, home: Path):
    unit_dir = home / ".config/systemd/user"
    out = lab.cli("service", "install", "--user", "--experimental-paging").stdout
    unit = unit_dir / "lab-attendant.service"
    dropin = unit_dir / "lab-attendant.service.d/experimental-paging.conf"
    assert "Type=notify" in unit.read_text() and "--experimental-paging" in dropin.read_text()
    assert "  systemctl --user daemon-reload\n" in out
    assert "  systemctl --user enable --now lab-attendant.service\n" in out
    out = lab.cli("service", "uninstall", "--user").stdout
    assert f"removed {dropin}" in out and f"removed {unit}" in out
    assert list(unit_dir.iterdir()) == []
    assert "  systemctl --user daemon-reload" in out
    assert "nothing to remove" in lab.cli("service", "uninstall", "--user").stdout


@pytest.mark.parametrize("sudo_user", ["alice", None], ids=["sudo", "no-sudo"])
def test_user_install_lingers_for_the_invoking_user_and_names_the_held_kinds(
        lab: Lab, home: Path, monkeypatch, sudo_user: str | None):
    if sudo_user:
        monkeypatch.setenv("SUDO_USER", sudo_user)
    else:
        monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", "bob")
    out = lab.cli("service", "install", "--user").stdout
    assert f"  loginctl enable-linger {sudo_user or 'bob'}\n" in out
    assert "enable-linger lab-attendant" not in out
    held = [k["name"] for k in json.loads(lab.cli("kinds", "--json").stdout) if k["needs_paging"]]
    assert held and f"holds runs of {', '.join(sorted(held))}" in out
    assert "lab-attendant service install --user --experimental-paging" in out
    paged = lab.cli("service", "install", "--user", "--experimental-paging").stdout
    assert "holds runs of" not in paged
    dropin = home / ".config/systemd/user/lab-attendant.service.d/experimental-paging.conf"
    assert any(ln.startswith("ExecStart=") and ln.rstrip().endswith("daemon --experimental-paging")
               for ln in dropin.read_text().splitlines())


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian "
                    "package `systemd`; scripts/test.sh installs it when it runs as root)")
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_unit_and_dropin_pass_systemd_analyze_verify(lab: Lab, tmp_path: Path,
                                                              monkeypatch, user: bool):
    unit_dir = tmp_path / "units"
    monkeypatch.setattr(service, "unit_dir", lambda _user: unit_dir)
    cfg = load_config(lab.config)
    files = service.render(cfg, user=user, experimental_paging=True, working_dir=lab.root)
    service.install(files, cfg, user=user)
    # System mode for both: a --user manager needs a runtime dir and bus that CI lacks, and
    # the keys of a user unit are a subset of the system one's.
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_LEVEL": "notice"}
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(files.unit_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    # verify exits 0 on unknown keys and only warns: any line about our files is a failure.
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "lab-attendant" in ln]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_daemon_rotates_both_logs_to_at_most_n_files_of_m_bytes(lab: Lab):
    with open(lab.config, "a") as fh:
        fh.write("\n[logging]\nmax_bytes = 600\nbackup_count = 2\n")
    lab.submit("sleepy", "seconds=0.1")
    lab.submit("sleepy", "seconds=0.1")
    paged = lab.submit("paging_echo", "lines=150")
    lab.cli("daemon", "--burst", "--experimental-paging", timeout=60)
    assert {r["state"] for r in json.loads(lab.cli("list", "--json").stdout)} == {"succeeded"}
    for name in ("lab_attendant.log", "experimental_paging.log"):
        files = sorted(lab.logs_dir.glob(name + "*"))
        assert [p.name for p in files] == [name, name + ".1", name + ".2"], files
        assert all(p.stat().st_size <= 600 for p in files), [p.stat().st_size for p in files]
        for p in files:                                   # rotation never splits a JSON line
            [json.loads(line) for line in p.read_text().splitlines()]
    shown = lab.cli("logs", str(paged)).stdout
    assert "paging-echo line 149" in shown                # the newest lines, across rotations
    assert "paging-echo line 0 " not in shown             # the oldest rotated away
