"""The worker's write sandbox (Linux Landlock, stdlib only): a launcher that takes away write access
everywhere except the folders it is given, then execs the worker; reads stay allowed.

Workers run as the daemon's user, so file modes cannot keep them from the store, the backups or
another run's folder; a Landlock domain can, and it survives exec and is inherited by every child.
`python -m jobs.contract.sandbox --rw DIR [--rw DIR ...] -- ARGV...` (the local executor and the
Slurm batch script put it in front of `python -m jobs.worker`); `landlock_abi()` tells the daemon
whether the kernel can do it. Device ioctls are not restricted (CUDA needs them; the unit's device
policy governs devices).
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
EXIT_SANDBOX = 70                        # the launcher could not confine the worker (EX_SOFTWARE)

# Landlock's filesystem access rights (linux/landlock.h), the write side only.
WRITE_FILE, REMOVE_DIR, REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK = 1 << 6, 1 << 7, 1 << 8, 1 << 9
MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE = 1 << 13, 1 << 14           # ABI 2, ABI 3
FILE_RIGHTS_ABI1 = WRITE_FILE
DIR_RIGHTS_ABI1 = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG
                   | MAKE_SOCK | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM)


class SandboxError(OSError):
    """The kernel refused to set up the sandbox."""


class _PathBeneath(ctypes.Structure):
    _pack_ = 1                           # struct landlock_path_beneath_attr is packed
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> tuple[int, str]:
    """(ABI version, "") where this kernel enforces Landlock; (0, why not) otherwise."""
    if not sys.platform.startswith("linux"):
        return 0, f"Landlock is a Linux feature (this is {sys.platform})"
    libc = _libc()
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi > 0:
        return int(abi), ""
    err = ctypes.get_errno()
    if err == 38:                        # ENOSYS
        return 0, "the kernel has no Landlock (Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK)"
    if err == 95:                        # EOPNOTSUPP
        return 0, "Landlock is built in but disabled (add landlock to the lsm= boot parameter)"
    return 0, f"Landlock is unavailable ({os.strerror(err)})"


def rights(abi: int) -> tuple[int, int]:
    """(rights on a folder and all beneath it, rights on a single file) handled at this ABI."""
    extra = (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    return DIR_RIGHTS_ABI1 | extra, FILE_RIGHTS_ABI1 | (TRUNCATE if abi >= 3 else 0)


def restrict_writes(writable: list[Path], *, device_dir: Path = Path("/dev")) -> int:
    """Confine this process (and what it execs or forks) so that it can change files only under
    `writable` and write (not create) device files under `device_dir`. Paths that do not exist
    are skipped. Returns the ABI used; SandboxError when the kernel refuses."""
    abi, why = landlock_abi()
    if abi == 0:
        raise SandboxError(why)
    dir_rights, file_rights = rights(abi)
    libc = _libc()
    handled = ctypes.c_uint64(dir_rights)   # struct landlock_ruleset_attr, first field only
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(handled),
                           ctypes.c_size_t(ctypes.sizeof(handled)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise SandboxError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        rules = [(p, None) for p in writable] + [(device_dir, file_rights)]
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
                attr = _PathBeneath(allowed if allowed is not None else
                                    (dir_rights if is_dir else file_rights), fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(attr),
                                ctypes.c_uint32(0)) < 0:
                    raise SandboxError(f"landlock_add_rule {path}: "
                                       f"{os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        # Required by restrict_self without CAP_SYS_ADMIN; also keeps setuid programs from
        # gaining rights the sandbox would not see.
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise SandboxError(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return abi


def launcher_argv(python: str, writable: list[Path], *, required: bool = True) -> list[str]:
    """What goes in front of the worker's argv: `python -m jobs.contract.sandbox --rw ... --`.
    Not `required`: where the kernel cannot, the worker starts unconfined with a line on stderr
    (a Slurm node whose kernel the daemon cannot probe)."""
    argv = [python, "-m", "jobs.contract.sandbox"]
    for path in writable:
        argv += ["--rw", str(path)]
    return [*argv, *([] if required else ["--if-available"]), "--"]


def _report(message: str) -> None:
    """One error event on the worker's event sink (so the run's reason says it), and stderr."""
    from jobs.contract import protocol
    print(f"lab-attendant sandbox: {message}", file=sys.stderr, flush=True)
    try:
        protocol.EventWriter().emit(protocol.ERROR, type="SandboxError", message=message)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m jobs.contract.sandbox [--rw DIR]... [--if-available] -- ARGV...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1:]
    writable = [Path(opts[i + 1]) for i, a in enumerate(opts[:-1]) if a == "--rw"]
    if not command:
        print("sandbox: nothing to run after --", file=sys.stderr)
        return 2
    try:
        restrict_writes(writable)
    except (SandboxError, OSError) as exc:
        if "--if-available" not in opts:
            _report(f"cannot confine the worker: {exc}; set [worker] sandbox = false to run "
                    "workers unconfined")
            return EXIT_SANDBOX
        print(f"lab-attendant sandbox: the worker runs unconfined: {exc}", file=sys.stderr,
              flush=True)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        _report(f"cannot start {command[0]}: {exc}")
    return EXIT_SANDBOX


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
