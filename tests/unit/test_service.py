"""Rendering the systemd unit: keys systemd needs, paths from the config, quoting, install files."""
from __future__ import annotations

import configparser
import os
import pwd
import re
import sys
from pathlib import Path

import pytest

from lab_attendant.cli import service
from lab_attendant.config import parse_config


def _parse(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(text)
    return cp


def _cfg(tmp_path: Path, **limits):
    data = {"paths": {"state_dir": "state dir", "logs_dir": "logs", "models_dir": str(tmp_path / "m")},
            "limits": {"shutdown_grace_s": 60.0, "kill_grace_s": 10.0, **limits},
            "service": {"watchdog_s": 20.0}}
    return parse_config(data, base_dir=tmp_path, source=tmp_path / "lab-attendant.toml")


def test_system_unit_has_notify_watchdog_kill_mode_and_hardening(tmp_path):
    files = service.render(_cfg(tmp_path), user=False, experimental_paging=False,
                           working_dir=tmp_path)
    assert files.unit_path == Path("/etc/systemd/system/lab-attendant.service")
    assert files.dropin_text is None
    s = _parse(files.unit_text)["Service"]
    assert (s["Type"], s["WatchdogSec"], s["Restart"], s["KillMode"]) == \
        ("notify", "20s", "on-failure", "mixed")
    assert s["TimeoutStopSec"] == "85s"                    # 60 + 10 + 15 margin
    assert (s["NoNewPrivileges"], s["ProtectSystem"], s["PrivateTmp"]) == ("yes", "strict", "yes")
    assert s["ReadWritePaths"] == f'"{tmp_path}/state dir" {tmp_path}/logs'
    assert s["ReadOnlyPaths"] == f"{tmp_path}/m"          # workers never write models
    assert "PrivateDevices" not in s and s["DeviceAllow"] == "char-nvidia* rw"   # the GPU stays
    assert s["WorkingDirectory"] == str(tmp_path)
    argv = s["ExecStart"].split()
    assert Path(argv[0]).is_absolute() and Path(argv[0]).parent == Path(sys.executable).parent
    assert argv[1:] == ["--config", str(tmp_path / "lab-attendant.toml"), "daemon"]
    assert _parse(files.unit_text)["Install"]["WantedBy"] == "multi-user.target"
    assert not re.search(r"@[A-Z_]+@", files.unit_text)   # no placeholder left


def test_user_unit_comments_out_system_only_lines_and_paging_is_a_dropin(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    files = service.render(_cfg(tmp_path, shutdown_grace_s=2.5, kill_grace_s=1.0), user=True,
                           experimental_paging=True)
    assert files.unit_path == tmp_path / "xdg/systemd/user/lab-attendant.service"
    s = _parse(files.unit_text)["Service"]
    assert "ProtectSystem" not in s and "User" not in s and s["NoNewPrivileges"] == "yes"
    assert "#ProtectSystem=strict" in files.unit_text
    assert s["TimeoutStopSec"] == "19s"                     # ceil(2.5 + 1 + 15)
    assert "--experimental-paging" not in s["ExecStart"]    # only the drop-in turns it on
    assert files.dropin_path == files.unit_path.parent / "lab-attendant.service.d" / \
        "experimental-paging.conf"
    lines = [ln for ln in files.dropin_text.splitlines() if ln.startswith("ExecStart=")]
    assert lines[0] == "ExecStart=" and lines[1].endswith(" daemon --experimental-paging")


@pytest.mark.parametrize("word, rendered", [
    ("/opt/lab/bin/lab-attendant", "/opt/lab/bin/lab-attendant"),
    ("/home/me/my lab/x.toml", '"/home/me/my lab/x.toml"'),
    ("/data/100%/$HOME", '"/data/100%%/$$HOME"'),
    ('/a "b"', '"/a \\"b\\""'),
])
def test_quote_for_unit_command_lines(word, rendered):
    assert service.quote(word) == rendered


def test_install_rewrites_and_removes_a_stale_dropin_then_uninstall_cleans_up(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(service, "SYSTEM_UNIT_DIR", tmp_path / "system")
    monkeypatch.setenv("SUDO_USER", "nobody")
    cfg = _cfg(tmp_path)
    paged = service.render(cfg, user=False, experimental_paging=True)
    commands = service.install(paged, cfg, user=False)
    assert commands == [["systemctl", "daemon-reload"],
                        ["systemctl", "enable", "--now", "lab-attendant.service"]]
    assert paged.dropin_path.read_text() == paged.dropin_text
    assert (tmp_path / "state dir").is_dir()               # ReadWritePaths must exist
    plain = service.render(cfg, user=False, experimental_paging=False)
    service.install(plain, cfg, user=False)                # paging off again: drop-in gone
    assert not paged.dropin_path.parent.exists()
    wants = tmp_path / "system/multi-user.target.wants"
    wants.mkdir()
    (wants / "lab-attendant.service").symlink_to(plain.unit_path)
    removed, commands = service.uninstall(user=False)
    assert removed == [wants / "lab-attendant.service", plain.unit_path]
    assert commands[-1] == ["systemctl", "daemon-reload"]
    assert sorted(p.name for p in (tmp_path / "system").rglob("*")) == ["multi-user.target.wants"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root (sudo service install) can chown")
def test_sudo_system_install_gives_new_folders_to_the_unit_user(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "SYSTEM_UNIT_DIR", tmp_path / "system")
    monkeypatch.setenv("SUDO_USER", "nobody")
    (tmp_path / "logs").mkdir()                             # existing folders are left alone
    cfg = _cfg(tmp_path)
    files = service.render(cfg, user=False, experimental_paging=False)
    assert "\nUser=nobody\n" in files.unit_text
    service.install(files, cfg, user=False)
    assert (tmp_path / "state dir").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert (tmp_path / "logs").stat().st_uid == 0


def test_hardening_keeps_the_gpu_usable_and_caches_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "nobody")
    files = service.render(_cfg(tmp_path), user=False, experimental_paging=False,
                           working_dir=tmp_path)
    s = _parse(files.unit_text)["Service"]
    for key in ("PrivateDevices", "MemoryDenyWriteExecute"):
        assert key not in s                               # /dev/nvidia* and CUDA's JIT keep working
    for key, value in [("DevicePolicy", "closed"), ("DeviceAllow", "char-nvidia* rw"),
                       ("SystemCallFilter", "@system-service landlock_create_ruleset "
                        "landlock_add_rule landlock_restrict_self"),
                       ("SystemCallErrorNumber", "EPERM"),
                       ("ProtectHome", "read-only"), ("ProtectKernelModules", "yes"),
                       ("RestrictSUIDSGID", "yes"), ("CapabilityBoundingSet", ""),
                       ("PrivateNetwork", "yes"), ("UMask", "0027"),
                       ("CacheDirectory", "lab-attendant")]:
        assert s[key] == value, key
    env = " ".join(ln for ln in files.unit_text.splitlines() if ln.startswith("Environment="))
    assert "TRITON_CACHE_DIR=%C/lab-attendant/triton" in env
    assert "CUDA_CACHE_PATH=%C/lab-attendant/cuda" in env
    assert "ExecStartPre" not in s and "#ExecStartPre=+" in files.unit_text   # opt-in only


@pytest.mark.skipif(os.stat("/usr/bin/true").st_uid != 0, reason="needs a root-owned /usr/bin")
def test_nvidia_modprobe_opt_in_runs_as_root_before_the_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "nobody")
    # A root-owned binary in a root-owned folder stands in for /usr/bin/nvidia-modprobe; one
    # planted first on PATH is never taken (it would run as root).
    planted = tmp_path / "bin" / "nvidia-modprobe"
    planted.parent.mkdir()
    planted.write_text("#!/bin/sh\n")
    planted.chmod(0o755)
    monkeypatch.setenv("PATH", f"{planted.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(service, "NVIDIA_MODPROBE_PATHS", ("/nonexistent/nvidia-modprobe",
                                                           "/usr/bin/true"))
    files = service.render(_cfg(tmp_path), user=False, experimental_paging=False,
                           nvidia_modprobe=True)
    s = _parse(files.unit_text)["Service"]
    assert s["ExecStartPre"] == "+/usr/bin/true -u -c=0"
    assert s["NoNewPrivileges"] == "yes"                  # the daemon itself keeps it
    with pytest.raises(service.UserError, match="udev rule"):
        service.render(_cfg(tmp_path), user=True, experimental_paging=False, nvidia_modprobe=True)


def test_root_without_sudo_gets_a_dedicated_user_it_is_told_to_create(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "SYSTEM_UNIT_DIR", tmp_path / "system")
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(service.getpass, "getuser", lambda: "root")
    monkeypatch.setattr(service, "DEDICATED_USER", "lab-attendant-test-nouser")
    cfg = _cfg(tmp_path)
    files = service.render(cfg, user=False, experimental_paging=False)
    assert _parse(files.unit_text)["Service"]["User"] == "lab-attendant-test-nouser"
    commands = service.install(files, cfg, user=False)
    assert commands[0][0] == "useradd" and commands[0][-1] == "lab-attendant-test-nouser"
    assert commands[1][:3] == ["chown", "-R", "lab-attendant-test-nouser:lab-attendant-test-nouser"]


def test_paths_under_tmp_are_warned_about(tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "nobody")
    cfg = parse_config({"paths": {"state_dir": "/tmp/lab-state"}}, base_dir=Path("/srv"),
                       source=None)
    files = service.render(cfg, user=False, experimental_paging=False, working_dir=Path("/srv"))
    assert any("state_dir /tmp/lab-state is under /tmp" in w and "PrivateTmp" in w
               for w in files.warnings)
    cfg = parse_config({"paths": {"state_dir": "/srv/lab-state", "logs_dir": "/srv/logs",
                                  "models_dir": "/srv/models"}}, base_dir=Path("/srv"), source=None)
    files = service.render(cfg, user=False, experimental_paging=False, working_dir=Path("/srv"))
    assert not [w for w in files.warnings if w.split()[0] in ("state_dir", "logs_dir", "models_dir",
                                                              "WorkingDirectory")]


def test_nvidia_modprobe_that_others_could_replace_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "nobody")
    planted = tmp_path / "nvidia-modprobe"       # under /tmp (1777) and pytest's folders
    planted.write_text("#!/bin/sh\n")
    monkeypatch.setattr(service, "NVIDIA_MODPROBE_PATHS", (str(planted),))
    with pytest.raises(service.UserError, match="not owned by root or is writable by others"):
        service.render(_cfg(tmp_path), user=False, experimental_paging=False, nvidia_modprobe=True)
    monkeypatch.setattr(service, "NVIDIA_MODPROBE_PATHS", ("/nonexistent/nvidia-modprobe",))
    with pytest.raises(service.UserError, match="no /usr/bin/nvidia-modprobe"):
        service.render(_cfg(tmp_path), user=False, experimental_paging=False, nvidia_modprobe=True)


@pytest.mark.parametrize("extra, why", [
    ({"notify": {"url": "https://ntfy.sh/lab"}}, "[notify] url"),
    ({"executor": {"default": "slurm"}}, "the Slurm executor"),
    ({"executor": {"kinds": {"probe": "slurm"}}}, "the Slurm executor")])
def test_the_network_sandbox_follows_the_config_and_says_what_it_relaxed(tmp_path, monkeypatch,
                                                                        extra, why):
    """PrivateNetwork=/IPAddressDeny= silently broke [notify] url and Slurm."""
    monkeypatch.setenv("SUDO_USER", "nobody")
    closed = _parse(service.render(_cfg(tmp_path), user=False,
                                   experimental_paging=False).unit_text)["Service"]
    assert closed["PrivateNetwork"] == "yes" and closed["IPAddressDeny"] == "any"
    assert closed["RestrictAddressFamilies"] == "AF_UNIX AF_NETLINK"
    cfg = parse_config({"paths": {"state_dir": "s", "logs_dir": "l", "models_dir": "m"}, **extra},
                       base_dir=tmp_path, source=None)
    files = service.render(cfg, user=False, experimental_paging=False)
    s = _parse(files.unit_text)["Service"]
    assert "PrivateNetwork" not in s and "IPAddressDeny" not in s
    assert s["RestrictAddressFamilies"] == "AF_UNIX AF_NETLINK AF_INET AF_INET6"
    assert any(why in w and "allows network access" in w for w in files.warnings)
