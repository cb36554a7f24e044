"""Describe the machine a benchmark ran on (stdlib only; torch and the GPU when the bench imported torch),
and write results JSON beside it."""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    info = {"hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem,
            "python": platform.python_version(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}
    torch = sys.modules.get("torch")  # never imported here: the supervisor benches run without it
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    path = RESULTS / f"{name}_{m['hostname']}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": m, **payload}, indent=2) + "\n")
    return path
