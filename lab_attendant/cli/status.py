"""`lab-attendant status`: what the daemon, queue, guards and co-tenants look like, read from the
store and the state-dir lock only (the CLI never talks to the daemon otherwise).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from jobs.contract.units import format_size
from lab_attendant.cli.render import duration, local_time, progress_text
from lab_attendant.config import Config
from lab_attendant.executors.workerfence import SANDBOX_META
from lab_attendant.service.lock import DaemonLock
from lab_attendant.store.db import Store
from lab_attendant.store.faults import StatusFile
from lab_attendant.store.figures import elapsed_s
from lab_attendant.store.queue import controls
from lab_attendant.store.states import ACTIVE, RunState
from lab_attendant.store.tables import GUARD_READINGS
from lab_attendant.validate import dumps

fmt_time = local_time      # local time with its zone


def gather(cfg: Config) -> dict[str, Any]:
    lock = DaemonLock(cfg.paths.state_dir)
    holder = lock.holder()
    alive = holder is not None and not holder.foreign
    fault = StatusFile.read(cfg.paths.state_dir / "daemon-status.json") if alive else {}
    store = Store(cfg.db_path)
    row = store.latest_daemon()
    counts = store.count_by_state()
    running = store.list_runs(states=ACTIVE)
    queue = controls(store)
    return {
        "daemon": {"alive": alive, "pid": row.pid if row and alive else None,
                   "experimental_paging": bool(row and alive and row.experimental_paging),
                   "heartbeat_age_s": (time.time() - row.heartbeat_at) if row and alive else None},
        "foreign_lock": (f"{lock.path} is locked by {holder.describe()}, not a daemon of this "
                         "user; a daemon cannot start until that process lets go"
                         if holder is not None and holder.foreign else None),
        "store_fault": fault.get("store_fault"),
        "queue_depth": counts.get(RunState.QUEUED, 0),
        "held": counts.get(RunState.HELD, 0),
        "paused_since": queue.paused_since,
        "parallel": queue.parallel(cfg.limits.max_concurrent),
        "parallel_override": queue.max_concurrent,
        "running": [{"id": r.id, "kind": r.kind, "state": r.state, "pid": r.pid,
                     "progress": progress_text(r), "elapsed_s": elapsed_s(r)} for r in running],
        "counts": counts, "state_dir": str(cfg.paths.state_dir),
        "guards": store.get_meta(GUARD_READINGS) if alive else None,
        "worker_sandbox": store.get_meta(SANDBOX_META) if alive else None,
        "guard_events": [g.to_dict() for g in store.guard_events(limit=20)],
        "cotenants": [c.to_dict() for c in store.cotenants()],
    }


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    st = gather(cfg)
    if args.json:
        print(dumps(st))
        return 0
    d = st["daemon"]
    if d["alive"]:
        print(f"daemon: running (pid {d['pid']}), experimental paging "
              f"{'on' if d['experimental_paging'] else 'off'}")
    else:
        print("daemon: not running (submitted runs wait in the queue)")
    if st["foreign_lock"]:
        print(f"LOCK HELD BY ANOTHER USER: {st['foreign_lock']}")
    if st["store_fault"]:
        print(f"STORE NOT WRITABLE: {st['store_fault']}; the daemon admits nothing, keeps "
              "supervising running runs and retries (free space or fix the disk)")
    box = st["worker_sandbox"]
    if box and box.get("missing"):
        print(f"WORKERS NOT SANDBOXED: {box['missing']}")
    elif box:
        print(f"workers: Landlock (ABI {box['landlock_abi']}), writable only: "
              f"{', '.join(box['writable'])}")
    print(f"queue: {st['queue_depth']} queued, {st['held']} held; {len(st['running'])} running")
    if st["paused_since"] is not None:
        print(f"  PAUSED since {fmt_time(st['paused_since'])} by `lab-attendant pause`: no run "
              "starts until `lab-attendant resume`; running ones go on")
    print(f"  parallel: up to {st['parallel']} at once" + (
        f" (set by `lab-attendant parallel`; the config says {cfg.limits.max_concurrent})"
        if st["parallel_override"] is not None else ""))
    for r in st["running"]:
        print(f"  run {r['id']} {r['kind']} {r['state']} pid {r['pid']}, for "
              f"{duration(r['elapsed_s'])}, progress {r['progress']}")
    g = st["guards"]
    if g:
        print(f"guards (read {time.time() - g['at']:.0f} s ago):")
        for gpu in g.get("gpus") or []:
            used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
            mem = f"{format_size(used)} / {format_size(total)}" if used is not None and total else "?"
            throttle = f", throttling: {', '.join(gpu['throttle_reasons'])}" if gpu.get(
                "throttle_reasons") else ""
            print(f"  GPU {gpu['index']}: {gpu.get('temperature_c')} °C, memory {mem}{throttle}")
        if g.get("gpu_unavailable"):
            print(f"  GPU readings unavailable: {g['gpu_unavailable']}")
        print(f"  host available RAM: {format_size(g['available_ram_bytes'])}")
        for rid, w in (g.get("workers") or {}).items():
            gpu_b = format_size(w["gpu_bytes"]) if w.get("gpu_bytes") is not None else "?"
            print(f"  run {rid}: RSS {format_size(w['rss_bytes'] or 0)}, GPU {gpu_b}")
        if g.get("paging_hold"):
            print(f"  paging hold: {g['paging_hold']}")
    for c in st["cotenants"]:
        print(f"co-tenant {c['name']}: {'SUSPENDED' if c['suspended'] else 'running'} "
              f"since {fmt_time(c['changed_at'])} ({c['note']})")
    if st["guard_events"]:
        print("recent guard events:")
        for e in st["guard_events"][-5:]:
            print(f"  {fmt_time(e['at'])}  {e['guard']} {e['action']}: {e['reason']}")
    return 0
