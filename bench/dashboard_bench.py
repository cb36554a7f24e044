"""Dashboard page-load times (browser navigation timing, headless Chromium) and the dashboard
process's RSS after serving them, against a store a real daemon wrote (tests/fixtures/dashboard.py).

Usage: .venv/bin/python bench/dashboard_bench.py [--loads N] [--screenshots docs]
Needs Debian's chromium + chromium-driver and selenium. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine, write_results  # noqa: E402

from tests.fixtures.dashboard import (  # noqa: E402
    browser_missing,
    chrome,
    full_page_screenshot,
    page_load_ms,
    populate,
    start_dashboard,
    stop,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=10, help="loads of each page (default 10)")
    ap.add_argument("--screenshots", type=Path,
                    help="save dashboard-runs.png, dashboard-run.png, dashboard-guards.png here")
    args = ap.parse_args()
    why = browser_missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        pop = populate(Path(tmp) / "lab")
        proc, url = start_dashboard(pop.lab)
        rss_start = psutil.Process(proc.pid).memory_info().rss
        driver = chrome(Path(tmp) / "profile")
        pages = {"runs (/)": url + "/", "run detail": f"{url}/runs/{pop.report}",
                 "guards": url + "/guards", "schedules": url + "/schedules"}
        times: dict[str, list[float]] = {}
        try:
            for name, page in pages.items():
                for _ in range(args.loads):
                    driver.get(page)
                    times.setdefault(name, []).append(page_load_ms(driver))
            if args.screenshots:
                driver.get(pages["runs (/)"])
                full_page_screenshot(driver, args.screenshots / "dashboard-runs.png")
                driver.get(pages["run detail"])
                full_page_screenshot(driver, args.screenshots / "dashboard-run.png")
                driver.get(pages["guards"])
                full_page_screenshot(driver, args.screenshots / "dashboard-guards.png")
        finally:
            driver.quit()
            rss_end = psutil.Process(proc.pid).memory_info().rss
            stop(proc)
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_avg_1m']:.1f}; "
          f"{args.loads} loads per page")
    print(f"{'page':<12} {'median ms':>10} {'max ms':>8}")
    for name, ms in times.items():
        print(f"{name:<12} {statistics.median(ms):>10.0f} {max(ms):>8.0f}")
    print(f"dashboard RSS: {rss_start / 2**20:.0f} MiB at start, {rss_end / 2**20:.0f} MiB after "
          f"{args.loads * len(pages)} page loads")
    path = write_results("dashboard", {
        "loads_per_page": args.loads,
        "page_load_ms": {k: {"median": statistics.median(v), "max": max(v), "all": v}
                         for k, v in times.items()},
        "rss_bytes": {"start": rss_start, "after_loads": rss_end}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
