"""Thermal guard reaction time: from a sensor reading above the limit to the worker's death.

Usage: .venv/bin/python bench/guard_bench.py [--trials N]
Real daemon, file sensors (the seam's simulation source), fixture paging workers that either
honour SIGTERM or ignore it (then SIGKILL after kill_grace_s). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INTERVAL_S, GRACE_S = 0.5, 2.0


def _sensors(path: Path, temp: float) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": [{"index": 0, "temperature_c": temp}]}))
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def trial(ignore_sigterm: bool) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="la-guard-"))
    sensors = tmp / "sensors.json"
    _sensors(sensors, 60)
    cfg = tmp / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "var"\nlogs_dir = "logs"\n'
                   f'[worker]\npython = "{sys.executable}"\nextra_kinds = ["tests.fixtures.kinds"]\n'
                   f'[limits]\nkill_grace_s = {GRACE_S}\n[daemon]\npoll_interval_s = 0.25\n'
                   f'[guards]\nsensors = "file:{sensors}"\nguard_interval_s = {INTERVAL_S}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "lab_attendant.cli.main", "--config", str(cfg)]
    subprocess.run([*cli, "submit", "paging_sleepy", "-p", "seconds=120", "-p",
                    f"ignore_sigterm={str(ignore_sigterm).lower()}"], check=True, env=env,
                   capture_output=True)
    daemon = subprocess.Popen([*cli, "daemon", "--experimental-paging"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        db = tmp / "var" / "lab_attendant.sqlite3"
        pid = None
        while pid is None:
            time.sleep(0.05)
            if db.exists():
                row = sqlite3.connect(db).execute(
                    "SELECT pid FROM runs WHERE state = 'running'").fetchone()
                pid = row[0] if row else None
        pid_file = tmp / "var" / "runs" / "1" / "output" / "worker.pid"
        while not pid_file.exists():
            time.sleep(0.02)
        time.sleep(0.3)
        t0 = time.monotonic()
        _sensors(sensors, 91)
        while _alive(pid):
            time.sleep(0.005)
        return time.monotonic() - t0
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for deaf in (False, True):
        times = [trial(deaf) for _ in range(args.trials)]
        rows["ignores SIGTERM" if deaf else "honours SIGTERM"] = times
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores; guard_interval_s={INTERVAL_S}, "
          f"kill_grace_s={GRACE_S}, trials={args.trials}")
    print(f"{'worker':<18} {'median s':>9} {'max s':>7} {'bound s':>8}")
    for name, times in rows.items():
        bound = INTERVAL_S + (GRACE_S if "ignores" in name else 0)
        print(f"{name:<18} {statistics.median(times):>9.3f} {max(times):>7.3f} {bound:>8.2f}")
    path = write_results("guard", {"guard_interval_s": INTERVAL_S, "kill_grace_s": GRACE_S,
                                   "reaction_s": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
