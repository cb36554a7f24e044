"""The read bandwidth the probe kind measured, remembered per disk in state_dir/read_bandwidth.json so the
memory plan's disk bound uses it for any model on that disk (stdlib only: the probe writes, the plan reads)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from jobs.contract.atomic import write_atomic

REMEMBERED_NAME = "read_bandwidth.json"


def _device_of(path: Path) -> str | None:
    try:
        return str(os.stat(path).st_dev)
    except OSError:
        return None


def remember_read_bandwidth(state_dir: Path, measured: dict[str, Any]) -> bool:
    """Keep a probe's measurement (measure_read_bandwidth's dict) for the disk it read; only a read with the
    page cache dropped measures the disk, so a warm read is not kept. True when it was kept."""
    device = _device_of(Path(measured["path"]))
    if device is None or not measured.get("bytes_per_s") or not measured.get("page_cache_dropped"):
        return False
    path = Path(state_dir) / REMEMBERED_NAME
    known = _load(path)
    known[device] = {"bytes_per_s": float(measured["bytes_per_s"]), "path": measured["path"],
                     "bytes_read": measured.get("bytes_read"), "measured_at": time.time()}
    write_atomic(path, (json.dumps(known, indent=2) + "\n").encode())
    return True


def remembered_read_bandwidth(state_dir: Path, model_path: Path) -> tuple[float, str] | None:
    """(bytes/s, where it came from) for the disk holding model_path, None when no probe measured it."""
    device = _device_of(Path(model_path))
    entry = _load(Path(state_dir) / REMEMBERED_NAME).get(device or "")
    if not entry:
        return None
    when = time.strftime("%Y-%m-%d", time.localtime(entry.get("measured_at", 0)))
    return float(entry["bytes_per_s"]), f"probe of {entry['path']} on {when}"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}   # never measured, or a damaged file: the plan says how to measure
    return data if isinstance(data, dict) else {}
