"""Supervisor figures: submit -> worker-running latency, submit CLI wall time, daemon RSS.

Usage: .venv/bin/python bench/supervisor_bench.py [--runs N]
Starts a real daemon on a temp state dir and submits `probe` runs one after another.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cli(cfg: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(cfg), *args],
                          check=True, capture_output=True, text=True, cwd=ROOT).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--python", default=str(ROOT / "venvs" / "experimental" / "bin" / "python"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="la-bench-"))
    blob = tmp / "blob.bin"
    blob.write_bytes(os.urandom(1024 * 1024))
    cfg = tmp / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "var"\nlogs_dir = "logs"\nallowed_roots = ["{tmp}"]\n'
                   f'[worker]\npython = "{args.python}"\n[limits]\nmax_concurrent = 1\n')
    daemon = subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(cfg),
                               "daemon"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(2.0)
    rss_idle = psutil.Process(daemon.pid).memory_info().rss
    latencies, submit_wall, rss_peak = [], [], rss_idle
    try:
        for _ in range(args.runs):
            t0 = time.time()
            rid = int(cli(cfg, "submit", "probe", "-p", f"path={blob}").strip())
            submit_wall.append(time.time() - t0)
            while True:
                run = json.loads(cli(cfg, "show", str(rid), "--json"))
                rss_peak = max(rss_peak, psutil.Process(daemon.pid).memory_info().rss)
                if run["state"] in ("succeeded", "failed"):
                    break
                time.sleep(0.05)
            assert run["state"] == "succeeded", run["reason"]
            latencies.append(run["running_at"] - run["submitted_at"])
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    q = statistics.quantiles(latencies, n=20)
    rows = {
        "submit -> worker running, median (s)": statistics.median(latencies),
        "submit -> worker running, p95 (s)": q[-1],
        "submit CLI wall time, median (s)": statistics.median(submit_wall),
        "daemon RSS idle (MiB)": rss_idle / 2**20,
        "daemon RSS peak (MiB)": rss_peak / 2**20,
    }
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['hostname']}; runs: {args.runs}")
    print(f"{'figure':<40} {'value':>10}")
    for k, v in rows.items():
        print(f"{k:<40} {v:>10.3f}")
    path = write_results("supervisor", {"runs": args.runs, "figures": rows,
                                        "latencies_s": latencies})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
