"""Executors compared: submit -> running latency and throughput, `local` vs `slurm`, in one run.

Usage: .venv/bin/python bench/executor_bench.py [--runs 50] [--latency-runs 10] [--seconds 0.1]
A real daemon on a temp state dir per executor, the `sleepy` test kind (the shortest real worker:
python start, spec, events, result) run with the project's python. Latency: runs submitted one at
a time (queue empty), submit -> `started` event applied. Throughput: `--runs` submitted at once,
first submit -> last end. Slurm: the cluster named by $SLURM_CONF, else a single-node one brought
up (and down) with scripts/slurm.sh. Config defaults throughout (slurm poll_interval_s = 1 s).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lab_attendant.store.db import Store  # noqa: E402
from lab_attendant.store.states import TERMINAL  # noqa: E402


def lab(executor: str, max_concurrent: int) -> tuple[Path, Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f"la-exbench-{executor}-"))
    cfg = tmp / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "var"\nlogs_dir = "logs"\n'
                   f'[worker]\npython = "{sys.executable}"\nextra_kinds = ["tests.fixtures.kinds"]\n'
                   f'[limits]\nmax_concurrent = {max_concurrent}\n[guards]\nsensors = "none"\n'
                   f'[executor]\ndefault = "{executor}"\n')
    return tmp, cfg


def wait_all(store: Store, ids: list[int]) -> list:
    while True:
        runs = [store.get(i) for i in ids]
        if all(r.state in TERMINAL for r in runs):
            return runs
        time.sleep(0.05)


def measure(executor: str, args: argparse.Namespace) -> dict:
    tmp, cfg = lab(executor, args.concurrency)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    daemon = subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(cfg),
                               "daemon"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    store = Store(tmp / "var" / "lab_attendant.sqlite3")
    params = {"seconds": args.seconds, "grandchild": False, "ignore_sigterm": False, "quiet": False}

    def submit() -> int:
        return store.submit(kind="sleepy", params=params, priority=0, timeout_s=600,
                            needs_paging=False, executor=executor).id
    try:
        time.sleep(2.0)                                   # daemon up
        wait_all(store, [submit()])                       # warm-up (the first Slurm job is slow)
        isolated = []
        for _ in range(args.latency_runs):
            (run,) = wait_all(store, [submit()])
            assert run.state.value == "succeeded", run.reason
            isolated.append(run.running_at - run.submitted_at)
        ids = [submit() for _ in range(args.runs)]
        runs = wait_all(store, ids)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    bad = [r for r in runs if r.state.value != "succeeded"]
    assert not bad, [(r.id, r.state, r.reason) for r in bad]
    wall = max(r.ended_at for r in runs) - min(r.submitted_at for r in runs)
    loaded = [r.running_at - r.submitted_at for r in runs]
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1]   # noqa: E731
    return {"executor": executor, "latency_p50_s": statistics.median(isolated),
            "latency_p95_s": pct(isolated, 95), "queued_latency_p50_s": statistics.median(loaded),
            "batch_wall_s": wall, "runs_per_min": len(runs) / wall * 60,
            "latencies_s": isolated, "queued_latencies_s": loaded}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50, help="runs submitted at once (throughput)")
    ap.add_argument("--latency-runs", type=int, default=10, help="runs one at a time (latency)")
    ap.add_argument("--seconds", type=float, default=0.1, help="each run's sleep")
    ap.add_argument("--concurrency", type=int, default=2, help="[limits] max_concurrent")
    args = ap.parse_args()
    cluster = None
    if not os.environ.get("SLURM_CONF"):
        cluster = Path(tempfile.mkdtemp(prefix="la-exbench-slurm-"))
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh"), "up", str(cluster)], check=True)
        os.environ["SLURM_CONF"] = str(cluster / "slurm.conf")
    try:
        results = [measure(ex, args) for ex in ("local", "slurm")]
    finally:
        if cluster is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh"), "down", str(cluster)])
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['hostname']}; sleepy {args.seconds} s, "
          f"max_concurrent {args.concurrency}, {args.latency_runs} lone runs, {args.runs} at once")
    print(f"{'executor':<9} {'p50 (s)':>8} {'p95 (s)':>8} {'queued p50 (s)':>15} "
          f"{'50-run wall (s)':>16} {'runs/min':>9}")
    for r in results:
        print(f"{r['executor']:<9} {r['latency_p50_s']:>8.3f} {r['latency_p95_s']:>8.3f} "
              f"{r['queued_latency_p50_s']:>15.2f} {r['batch_wall_s']:>16.1f} {r['runs_per_min']:>9.1f}")
    path = write_results("executor", {"args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
