"""Validation of what a user types or writes that a type alone cannot express: finite numbers in
declared ranges (config keys, submit options), the config's schedules (cron, kind, params); output
that never holds NaN/Infinity (JSON) nor control characters (a terminal, a notification).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from jobs.contract.errors import ParamError
from lab_attendant.errors import ConfigError, UserError

# Config keys with a range: (min, max, whether min itself is allowed). Every other float in the
# config only has to be finite (TOML reads `nan` and `inf`).
CONFIG_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "limits.max_concurrent": (1, 1024, True),
    "limits.default_timeout_s": (0, None, False),
    "limits.kill_grace_s": (0, None, True),
    "limits.shutdown_grace_s": (0, None, True),
    "worker.heartbeat_interval_s": (0, None, False),
    "daemon.poll_interval_s": (0, 60, False),
    "guards.guard_interval_s": (0, 60, False),
    "guards.kill_grace_s": (0, None, True),
    "executor.slurm.poll_interval_s": (0, 60, False),
    "executor.slurm.settle_s": (0, None, True),
    "executor.slurm.time_grace_s": (0, None, True),
    "executor.slurm.cpus": (0, 4096, True),
    "guards.sensors_lost_grace_s": (0, None, True),
    "logging.max_bytes": (0, None, True),
    "logging.backup_count": (0, 1000, True),
    "service.watchdog_s": (0, None, True),
    "backups.keep": (1, 1000, True),
    "backups.interval_s": (0, None, False),
    "retries.base_s": (0, None, True),
    "retries.max_s": (0, None, True),
    "retention.older_than_days": (0, None, True),
    "retention.interval_s": (0, None, False),
}
RETRY_RANGE = (0, 100)
COTENANT_RANGES = ("release_timeout_s", "restore_delay_s", "command_timeout_s", "retry_after_s")
PRIORITY_RANGE = (-1_000_000, 1_000_000)
MAX_TIMEOUT_S = 366 * 24 * 3600.0       # a year: beyond it a timeout is a typo, not a plan


def _range_text(lo: float | None, hi: float | None, inclusive: bool) -> str:
    low = None if lo is None else (f">= {lo:g}" if inclusive else f"> {lo:g}")
    high = None if hi is None else f"<= {hi:g}"
    return " and ".join(t for t in (low, high) if t)


def check_number(key: str, value: float, lo: float | None, hi: float | None,
                 inclusive: bool = True) -> None:
    """`value` is finite and in range, else ConfigError naming `key` and the range."""
    bad = (isinstance(value, float) and not math.isfinite(value)) or \
        (lo is not None and (value < lo if inclusive else value <= lo)) or \
        (hi is not None and value > hi)
    if bad:
        want = _range_text(lo, hi, inclusive) or "a finite number"
        raise ConfigError(f"config key '{key}' must be {want}, got {value!r}")


def _numbers(obj: Any, prefix: str = ""):
    """(dotted key, value) for every int/float field of a config dataclass tree."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _numbers(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}{i}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix.rstrip("."), obj


def check_config_numbers(cfg: Any) -> None:
    """Every number in the config finite; the keys in CONFIG_RANGES within their range."""
    for key, value in _numbers(cfg):
        if key in CONFIG_RANGES:
            check_number(key, value, *CONFIG_RANGES[key])
        elif key.startswith("cotenants.") and key.rsplit(".", 1)[1] in COTENANT_RANGES:
            check_number(key, value, 0, None)
        elif key.startswith("retries.kinds.") or (key.startswith("schedules.")
                                                  and key.endswith(".retries")):
            check_number(key, value, *RETRY_RANGE)
        else:
            check_number(key, value, None, None)


def check_schedules(cfg: Any) -> None:
    """Fail at config load, naming the schedule: duplicate id, bad cron or timezone, unknown kind,
    a param unknown, out of range or outside the allowed roots. Whether a path exists is checked
    at each firing."""
    from jobs.contract.kinds import registry, validate_params
    from lab_attendant import cron  # APScheduler's triggers: imported by the config load only
    try:
        kinds = registry(cfg.worker.extra_kinds)
    except ImportError as exc:
        raise ConfigError(f"config key 'worker.extra_kinds': cannot import {exc.name or exc}; "
                          "name a module on the supervisor's path that defines KINDS") from None
    unknown = sorted(set(cfg.retries.kinds) - set(kinds))
    if unknown:
        raise ConfigError(f"[retries] kinds names unknown kind {', '.join(unknown)}; known kinds: "
                          f"{', '.join(sorted(kinds))}")
    seen: set[str] = set()
    for s in cfg.schedules:
        where = f"schedule '{s.id}'"
        if s.id in seen:
            raise ConfigError(f"{where} is defined twice; give each [[schedules]] its own id")
        seen.add(s.id)
        try:
            cron.trigger(s.cron, s.timezone)
        except Exception as exc:  # noqa: BLE001 - APScheduler raises ValueError/KeyError/tz errors
            raise ConfigError(f"{where}: bad cron {s.cron!r} or timezone {s.timezone!r} ({exc}); "
                              "write e.g. cron = \"30 2 * * *\" for 02:30 every night") from None
        kind = kinds.get(s.kind)
        if kind is None:
            raise ConfigError(f"{where}: unknown kind '{s.kind}'; known kinds: "
                              f"{', '.join(sorted(kinds))}")
        try:  # like submit, but a folder may appear before the first firing
            validate_params(kind, s.params, cfg.allowed_roots, base_dir=cfg.base_dir,
                            must_exist=False)
        except ParamError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if s.misfire_grace_s <= 0:
            raise ConfigError(f"{where}: misfire_grace_s must be > 0 seconds")


def check_worker_python(python: Path) -> None:
    """The worker interpreter exists and can be executed (daemon start, submit)."""
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UserError(f"worker python {python} is missing or not executable; run "
                        "`lab-attendant venv create` or set [worker] python in the config")


def check_executor(executor: str, cfg: Any) -> None:
    """The chosen executor can take the run: the worker python for local runs (and for Slurm
    runs whose nodes use the same path), Slurm's sbatch on PATH for Slurm runs."""
    if executor == "local" or cfg.executor.slurm.python is None:
        check_worker_python(Path(cfg.worker.python))
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("Slurm's sbatch is not on PATH: install the Slurm client (Debian: "
                        "apt-get install slurm-client), point $SLURM_CONF at the cluster's "
                        "slurm.conf, or submit with --executor local")


def check_retries(retries: int | None) -> None:
    if retries is not None and not RETRY_RANGE[0] <= retries <= RETRY_RANGE[1]:
        raise UserError(f"--retries must be from {RETRY_RANGE[0]} to {RETRY_RANGE[1]}, got {retries}")


def check_submit_options(priority: int, timeout_s: float | None) -> None:
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        raise UserError(f"--priority must be an integer from {lo} to {hi}, got {priority}")
    if timeout_s is not None and not 0 < timeout_s <= MAX_TIMEOUT_S:   # False for NaN too
        raise UserError(f"--timeout must be a positive number of seconds, at most "
                        f"{MAX_TIMEOUT_S:.0f} (a year), got {timeout_s!r}")


def check_run_id(run_id: int) -> None:
    """Run ids are SQLite rowids: a positive 64-bit integer (larger ones overflow the driver)."""
    if not 1 <= run_id < 2**63:
        raise UserError(f"run id must be a positive integer, got {run_id}; see `lab-attendant list`")


def finite(obj: Any) -> Any:
    """obj with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON for output and storage: NaN/Infinity become null, never invalid JSON."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


# C0 controls (but tab and newline), DEL and C1: in a run name or reason an ESC would move the
# cursor or print an OSC 8 hyperlink on a terminal; a NUL or CR/LF makes the environment variable
# or HTTP header of a notification invalid, and the notification silently fails.
_CONTROLS = {c: None for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}
_LINE_BREAKS = {0x09: " ", 0x0A: " "}


def printable(text: str, *, one_line: bool = False) -> str:
    """`text` without control characters; with `one_line`, tabs and newlines become spaces."""
    text = text.translate(_CONTROLS)
    return text.translate(_LINE_BREAKS) if one_line else text
