"""`lab-attendant service install|uninstall`: the systemd unit. Renders systemd/lab-attendant.service (and the experimental-paging drop-in)
with this checkout's absolute paths and config, installs or removes them; systemctl is the user's.
"""
from __future__ import annotations

import argparse
import getpass
import math
import os
import pwd
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.contract.atomic import write_atomic
from jobs.contract.kinds import registry
from lab_attendant import PROJECT_ROOT
from lab_attendant.config import Config
from lab_attendant.errors import UserError

UNIT_NAME = "lab-attendant.service"
DROPIN_NAME = "experimental-paging.conf"
TEMPLATE_DIR = PROJECT_ROOT / "systemd"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# After the last worker group is gone the daemon still reaps, writes the store and exits.
STOP_MARGIN_S = 15.0
# A system unit installed by root itself (no sudo) runs as this user, not as root.
DEDICATED_USER = "lab-attendant"
NVIDIA_MODPROBE = "/usr/bin/nvidia-modprobe"
# Where --nvidia-modprobe looks (in order), never through PATH: it runs as root.
NVIDIA_MODPROBE_PATHS = (NVIDIA_MODPROBE, "/usr/local/bin/nvidia-modprobe")
# PrivateTmp= gives the service its own /tmp: anything of ours there is invisible to it.
PRIVATE_TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_BARE = re.compile(r"[A-Za-z0-9_+=:,./-]+")


@dataclass(frozen=True)
class UnitFiles:
    unit_path: Path
    unit_text: str
    dropin_path: Path                  # where the experimental-paging drop-in goes
    dropin_text: str | None            # None: no drop-in (paging stays off)
    user: str | None = None            # User= of a system unit
    warnings: tuple[str, ...] = ()     # what the installer should read before starting it


def unit_dir(user: bool) -> Path:
    if not user:
        return SYSTEM_UNIT_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def systemctl(user: bool, *args: str) -> list[str]:
    return ["systemctl", *(["--user"] if user else []), *args]


def quote(word: str) -> str:
    """One word of a unit-file command line or path list: '%' and '$' are systemd's specifier
    and variable marks, so double them; quote anything with spaces or odd characters."""
    word = word.replace("%", "%%").replace("$", "$$")
    if _BARE.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def daemon_argv(cfg: Config, *, experimental_paging: bool) -> list[str]:
    """The daemon command of this checkout: the venv's console script when there is one."""
    python = Path(sys.executable).absolute()   # not resolved: a venv's python is a symlink
    script = python.parent / "lab-attendant"
    argv = [str(script)] if script.is_file() else [str(python), "-m", "lab_attendant.cli.main"]
    if cfg.source is not None:
        argv += ["--config", str(cfg.source)]
    return argv + ["daemon"] + (["--experimental-paging"] if experimental_paging else [])


def timeout_stop_s(cfg: Config) -> int:
    """Long enough for a warm shutdown to end on its own before systemd's SIGKILL."""
    return math.ceil(cfg.limits.shutdown_grace_s + cfg.limits.kill_grace_s + STOP_MARGIN_S)


def run_as_user() -> str:
    """Whom a system unit runs as: the user behind sudo, else the caller; root installing
    without sudo gets a dedicated system user (DEDICATED_USER), never root."""
    who = invoking_user()
    return DEDICATED_USER if who == "root" else who


def invoking_user() -> str:
    """The person behind this command: the user behind sudo, else $USER, else the login name
    (a --user unit lingers for them, not for the dedicated system user)."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()


def paging_kinds(cfg: Config) -> list[str]:
    """The kinds a daemon started without --experimental-paging holds (they wait `held`)."""
    return sorted(k.name for k in registry(cfg.worker.extra_kinds).values() if k.needs_paging)


def _tmp_warnings(cfg: Config, working_dir: Path) -> tuple[str, ...]:
    """Paths the unit needs that PrivateTmp= would hide."""
    named = {"state_dir": cfg.paths.state_dir, "logs_dir": cfg.paths.logs_dir,
             "models_dir": cfg.paths.models_dir, "the checkout": PROJECT_ROOT,
             "WorkingDirectory": working_dir, "the venv": Path(sys.executable).parent,
             **({"the config file": cfg.source} if cfg.source else {})}
    out = []
    for what, path in named.items():
        absolute = Path(os.path.abspath(path))
        for tmp in PRIVATE_TMP_DIRS:
            if absolute.is_relative_to(tmp):
                out.append(f"{what} {absolute} is under {tmp}, which the unit's PrivateTmp=yes "
                           "hides from the service; move it elsewhere and re-run service install")
    return tuple(out)


def _fill(template: Path, values: dict[str, str]) -> str:
    lines = template.read_text().splitlines(keepends=True)
    text = "".join(ln for ln in lines if not ln.startswith("##"))
    values = {"TEMPLATE": str(template).replace("%", "%%"), **values}
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:  # pragma: no cover - a template edited without this function
        raise AssertionError(f"unfilled placeholders in the unit template: {left}")
    return text


def render(cfg: Config, *, user: bool, experimental_paging: bool,
           working_dir: Path | None = None, nvidia_modprobe: bool = False) -> UnitFiles:
    if cfg.service.watchdog_s and cfg.service.watchdog_s < 1:
        raise UserError("[service] watchdog_s must be 0 (off) or at least 1 s")
    if nvidia_modprobe and user:
        raise UserError("--nvidia-modprobe needs a system unit (it runs as root); for a --user "
                        "unit install the udev rule from README.md (\"Run as a service\")")
    modprobe = trusted_modprobe() if nvidia_modprobe else NVIDIA_MODPROBE
    working_dir = (working_dir or Path.cwd()).absolute()
    unit_user = run_as_user()
    base = unit_dir(user)
    paths = [os.path.abspath(p) for p in (cfg.paths.state_dir, cfg.paths.logs_dir)]
    needs = network_needs(cfg)
    relaxed = (f"the unit allows network access (PrivateNetwork= and IPAddressDeny= left out, "
               f"AF_INET/AF_INET6 allowed) because {' and '.join(needs)} "
               f"need{'s' if len(needs) == 1 else ''} it",) \
        if needs and not user else ()
    values = {
        "PROJECT_ROOT": str(PROJECT_ROOT).replace("%", "%%"),
        "WORKING_DIRECTORY": str(working_dir).replace("%", "%%"),
        "WATCHDOG_SEC": f"{cfg.service.watchdog_s:g}s",
        "TIMEOUT_STOP_SEC": f"{timeout_stop_s(cfg)}s",
        "USER": unit_user,
        "NVIDIA_COMMENT": "" if nvidia_modprobe else "#",
        "NVIDIA_MODPROBE": quote(modprobe),
        "READ_WRITE_PATHS": " ".join(quote(p) for p in dict.fromkeys(paths)),
        "READ_ONLY_PATHS": quote(os.path.abspath(cfg.paths.models_dir)),
        "NETWORK_OFF": "#" if needs else "",
        "ADDRESS_FAMILIES": "AF_UNIX AF_NETLINK" + (" AF_INET AF_INET6" if needs else ""),
        "SYSTEM_ONLY": "#" if user else "",
        "WANTED_BY": "default.target" if user else "multi-user.target",
    }
    argv = daemon_argv(cfg, experimental_paging=False)
    unit = _fill(TEMPLATE_DIR / UNIT_NAME,
                 {**values, "EXEC_START": " ".join(quote(a) for a in argv)})
    dropin = None
    if experimental_paging:
        paging_argv = daemon_argv(cfg, experimental_paging=True)
        dropin = _fill(TEMPLATE_DIR / DROPIN_NAME,
                       {"EXEC_START": " ".join(quote(a) for a in paging_argv)})
    return UnitFiles(base / UNIT_NAME, unit, base / f"{UNIT_NAME}.d" / DROPIN_NAME, dropin,
                     user=None if user else unit_user,
                     warnings=_tmp_warnings(cfg, working_dir) + relaxed)


def network_needs(cfg: Config) -> list[str]:
    """What in the config talks to a network (the unit's sandbox has none otherwise)."""
    needs = []
    if cfg.notify.url:
        needs.append("[notify] url")
    ex = cfg.executor
    if "slurm" in (ex.default, *ex.kinds.values(), *ex.models.values()):
        needs.append("the Slurm executor (sbatch, squeue, munge)")
    return needs


def trusted_modprobe() -> str:
    """nvidia-modprobe for the root ExecStartPre: a fixed path, root-owned and writable by root
    only (the folders above it too), never whatever `PATH` finds first."""
    for candidate in NVIDIA_MODPROBE_PATHS:
        path = Path(candidate)
        if not path.is_file():
            continue
        unsafe = [p for p in (path, *path.parents)
                  if p.stat().st_uid != 0 or p.stat().st_mode & 0o022]
        if unsafe:
            raise UserError(f"{path} would run as root, but {unsafe[0]} is not owned by root or "
                            "is writable by others; reinstall the NVIDIA utilities from the "
                            "distribution, or leave out --nvidia-modprobe and use the udev rule")
        return str(path)
    raise UserError(f"--nvidia-modprobe: no {NVIDIA_MODPROBE}; install the distribution's "
                    "nvidia-modprobe package, or leave the flag out and use the udev rule")


def _permission_hint(path: Path, user: bool) -> UserError:
    how = "" if user else "; install system-wide with sudo (sudo .venv/bin/lab-attendant " \
        "service install) or per user with --user"
    return UserError(f"cannot write {path}: permission denied{how}")


def install(files: UnitFiles, cfg: Config, *, user: bool) -> list[list[str]]:
    """Write the unit (and the drop-in, or remove a stale one: paging is on only while a unit
    says so); create the ReadWritePaths (systemd refuses to start with a missing one).
    Returns the systemctl commands the user should run."""
    try:
        files.unit_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(files.unit_path, files.unit_text.encode())
        files.unit_path.chmod(0o644)   # a unit is no secret; `systemctl cat` reads it as anyone
        if files.dropin_text is not None:
            files.dropin_path.parent.mkdir(mode=0o755, exist_ok=True)
            write_atomic(files.dropin_path, files.dropin_text.encode())
            files.dropin_path.chmod(0o644)
        else:
            _remove(files.dropin_path)
        for path in (cfg.paths.state_dir, cfg.paths.logs_dir, cfg.paths.models_dir):
            _make_dir_for_service(path, files.user)
    except PermissionError as exc:
        raise _permission_hint(Path(exc.filename or files.unit_path), user) from None
    commands = []
    if files.user == DEDICATED_USER and not _user_exists(DEDICATED_USER):
        # The dedicated user is made by you, like the systemctl calls: we print, never run.
        commands += [["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                      "/usr/sbin/nologin", DEDICATED_USER],
                     ["chown", "-R", f"{DEDICATED_USER}:{DEDICATED_USER}",
                      *(os.path.abspath(p) for p in (cfg.paths.state_dir, cfg.paths.logs_dir))]]
    return commands + [systemctl(user, "daemon-reload"),
                       systemctl(user, "enable", "--now", UNIT_NAME)]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _make_dir_for_service(path: Path, owner: str | None) -> None:
    """Create a folder the service writes to; one that `sudo service install` creates is given
    to the User= the system unit runs as, or the daemon could not write its own state."""
    if path.is_dir():
        return
    path.mkdir(parents=True)
    if owner and os.geteuid() == 0 and owner != "root" and _user_exists(owner):
        shutil.chown(path, user=owner, group=pwd.getpwnam(owner).pw_gid)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    if path.parent.name.endswith(".d"):
        try:
            path.parent.rmdir()
        except OSError:  # not empty: the user's own drop-ins stay
            pass
    return True


def uninstall(*, user: bool) -> tuple[list[Path], list[list[str]]]:
    """Remove the unit, our drop-in and the enable links that point at the unit (what
    `systemctl disable` would remove). Returns what was removed and the commands to run."""
    base = unit_dir(user)
    candidates = [base / f"{UNIT_NAME}.d" / DROPIN_NAME,
                  *sorted(base.glob(f"*.wants/{UNIT_NAME}")), base / UNIT_NAME]
    try:
        removed = [p for p in candidates if _remove(p)]
    except PermissionError as exc:
        raise _permission_hint(Path(exc.filename or base), user) from None
    return removed, [systemctl(user, "stop", UNIT_NAME), systemctl(user, "daemon-reload")]


# -- the verb ---------------------------------------------------------------------------------------
def cmd_service(cfg: Config, args: argparse.Namespace) -> int:
    if args.service_cmd == "uninstall":
        removed, commands = uninstall(user=args.user)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"nothing to remove: no {UNIT_NAME} in {unit_dir(args.user)}")
    else:
        files = render(cfg, user=args.user, experimental_paging=args.experimental_paging,
                       nvidia_modprobe=args.nvidia_modprobe)
        for warning in files.warnings:
            print(f"lab-attendant: warning: {warning}", file=sys.stderr)
        if args.print:
            print(files.unit_text, end="")
            if files.dropin_text is not None:
                print(f"\n# ---- drop-in {files.dropin_path}\n{files.dropin_text}", end="")
            return 0
        commands = install(files, cfg, user=args.user)
        print(f"wrote {files.unit_path}")
        if files.dropin_text is not None:
            print(f"wrote {files.dropin_path} (experimental paging on while it exists)")
        if args.user:
            commands.append(["loginctl", "enable-linger", invoking_user()])
        held = paging_kinds(cfg)
        if not args.experimental_paging and held:
            print(f"without --experimental-paging the daemon holds runs of {', '.join(held)} "
                  "(they wait `held`); to allow them, re-run: lab-attendant service install"
                  f"{' --user' if args.user else ''} --experimental-paging")
    print("lab-attendant does not run systemctl itself; now run:")
    for argv in commands:
        print("  " + shlex.join(argv))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("service", help="install or remove the systemd unit (prints the "
                        "systemctl commands, does not run them)")
    svsub = sv.add_subparsers(dest="service_cmd", required=True)
    si = svsub.add_parser("install", help="render the unit with this checkout's paths and write "
                          "it to /etc/systemd/system (or ~/.config/systemd/user with --user)")
    si.add_argument("--experimental-paging", action="store_true",
                    help="also write a drop-in that starts the daemon with the flag")
    si.add_argument("--print", action="store_true", help="print the unit, write nothing")
    si.add_argument("--nvidia-modprobe", action="store_true",
                    help="run nvidia-modprobe as root before the daemon starts (creates "
                    "/dev/nvidia-uvm after a boot; NoNewPrivileges= blocks its setuid bit)")
    su = svsub.add_parser("uninstall", help="remove the unit, its drop-in and enable links")
    for p_ in (si, su):
        p_.add_argument("--user", action="store_true", help="a systemd --user unit")
    sv.set_defaults(fn=cmd_service)
