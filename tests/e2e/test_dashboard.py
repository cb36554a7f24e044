"""The dashboard against a store a real daemon wrote: samples in `show`, the JSON API and the SVG
plots; /metrics; the store is never written; and the pages in real headless Chromium."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab_attendant.dashboard.readonly import connect_readonly
from tests.conftest import ROOT, Lab, wait_for, write_config
from tests.fixtures.dashboard import (
    browser_missing,
    chrome,
    full_page_screenshot,
    get,
    page_load_ms,
    populate,
    start_dashboard,
    stop,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    pop = populate(tmp_path_factory.mktemp("dash"))
    proc, url = start_dashboard(pop.lab)
    yield pop, proc, url
    stop(proc)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(get(url + "/metrics").decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_samples_from_file_sensors_reach_show_api_and_plot(dash):
    pop, _, url = dash
    shown = pop.lab.show(pop.report)["samples"]
    temp = shown["series"]["gpu_temperature_c"]
    assert temp["min"] == 60.0 and temp["max"] == 80.0, temp
    assert shown["series"]["gpu_memory_bytes"]["max"] == 300 * 1024**2
    assert shown["series"]["tokens_per_s"]["max"] >= 20.0
    assert shown["series"]["read_bytes_per_s"]["max"] > 0
    assert shown["above_resume_s"] > 0                    # 80 °C > 75 °C resume level
    assert shown["series"]["gpu_power_w"]["max"] == 240.5
    assert shown["series"]["gpu_sm_clock_mhz"]["min"] == 1545
    assert shown["throttle_reasons"] == ["SwPowerCap"]
    text = pop.lab.cli("show", str(pop.report)).stdout
    assert "GPU temperature" in text and "max 80.0 °C" in text and "above 75 °C" in text

    api = json.loads(get(f"{url}/api/runs/{pop.report}"))
    temps = [s["gpu_temperature_c"] for s in api["samples"]]
    assert len(temps) == shown["samples"] and 60.0 in temps and 80.0 in temps
    html = get(f"{url}/runs/{pop.report}").decode()
    assert 'id="plot-temperature" xmlns="http://www.w3.org/2000/svg"' in html
    assert f'data-points="{len(temps)}"' in html and "85 °C limit" in html
    assert "<h1>Insights: fixture archive</h1>" in html   # insights.md rendered
    assert "note batch 1: summarized" in html             # the log tail
    table = get(f"{url}/?kind=insights_report").decode()
    assert '<progress max="1" value="1.000"></progress> 10/10 notes' in table
    assert f'data-run-id="{pop.crash}"' not in table                  # filtered by kind
    runs = json.loads(get(f"{url}/api/runs?state=failed"))
    assert pop.crash in [r["id"] for r in runs] and {r["state"] for r in runs} == {"failed"}


def test_dashboard_never_writes_the_store(dash):
    pop, _, url = dash
    db = pop.lab.state_dir / "lab_attendant.sqlite3"

    def snapshot() -> dict[str, tuple]:
        # The store is the database and its WAL: neither may change at all. The -shm is SQLite's
        # shared-memory WAL index, which readers legitimately write (read marks; a reader rebuilds
        # its header after the last writer closed), so it is not compared.
        return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(db.parent.glob(db.name + "*")) if not p.name.endswith("-shm")}
    before = snapshot()
    for path in ("/", f"/runs/{pop.report}", f"/runs/{pop.hot}", "/guards", "/schedules",
                 "/api/runs", f"/api/runs/{pop.report}", "/metrics",
                 f"/runs/{pop.report}/outputs/insights.md"):
        get(url + path)
    assert snapshot() == before
    for method in ("POST", "PUT", "DELETE"):           # no write endpoint exists
        req = urllib.request.Request(f"{url}/api/runs/{pop.report}", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 405
    conn = connect_readonly(db)                         # the dashboard's own connection
    with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
        conn.execute("UPDATE runs SET reason = 'x'")
    conn.close()
    assert snapshot() == before


def test_metrics_parse_and_counters_move_when_runs_end(dash):
    pop, _, url = dash
    before = _metrics(url)
    key = ("lab_attendant_runs_total", (("kind", "crash"), ("state", "failed")))
    assert before[key] == 1.0
    assert before[("lab_attendant_runs_total", (("kind", "insights_report"),
                                                ("state", "succeeded")))] == 1.0
    assert before[("lab_attendant_last_run_tokens_per_second", (("kind", "insights_report"),))] >= 20
    assert ("lab_attendant_gpu_temperature_celsius", (("gpu", "0"),)) in before
    assert before[("lab_attendant_guard_kills_total", (("reason", "thermal"),))] == 1.0
    assert before[("lab_attendant_runs_total", (("kind", "paging_sleepy"),
                                                ("state", "killed_thermal")))] == 1.0
    count = ("lab_attendant_run_duration_seconds_count", (("kind", "insights_report"),))
    assert before[count] == 1.0
    pop.lab.submit("crash")
    pop.lab.cli("daemon", "--burst", timeout=60)
    after = _metrics(url)
    assert after[key] == before[key] + 1
    # The Grafana dashboard we ship asks only for series /metrics has.
    grafana = (ROOT / "examples" / "grafana" / "lab-attendant.json").read_text()
    asked = set(re.findall(r"lab_attendant_[a-z_]+", grafana))
    served = set(re.findall(r"lab_attendant_[a-z_]+", get(url + "/metrics").decode()))
    assert asked and asked <= served, asked - served


def test_bind_beyond_loopback_is_refused_and_a_missing_store_is_named(tmp_path: Path):
    lab = Lab(tmp_path, write_config(tmp_path))
    proc = lab.cli("dashboard", "--bind", "0.0.0.0:8765", check=False)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr and "no login" in proc.stderr
    proc = lab.cli("dashboard", "--bind", "127.0.0.1:8765", check=False)
    assert proc.returncode == 2 and "no store at" in proc.stderr, proc.stderr
    assert not (lab.state_dir / "lab_attendant.sqlite3").exists()   # not created by the attempt


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_pages_in_headless_chromium(dash, tmp_path: Path):
    from selenium.webdriver.common.by import By
    pop, proc, url = dash
    shots = Path(os.environ.get("LAB_ATTENDANT_SCREENSHOTS", tmp_path))
    driver = chrome(tmp_path / "profile")
    try:
        driver.get(url + "/")
        runs_ms = page_load_ms(driver)
        ids = {int(tr.get_attribute("data-run-id"))
               for tr in driver.find_elements(By.CSS_SELECTOR, "table#runs tbody tr[data-run-id]")}
        assert {pop.report, pop.crash} <= ids
        queued = pop.lab.submit("sleepy")   # the table refreshes itself from /api/runs
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f'tr[data-run-id="{queued}"]'),
                 30, "the new run to appear")
        full_page_screenshot(driver, shots / "dashboard-runs.png")

        driver.get(f"{url}/runs/{pop.report}")
        run_ms = page_load_ms(driver)
        svg = driver.find_element(By.CSS_SELECTOR, "svg#plot-temperature")
        points = svg.find_element(By.TAG_NAME, "polyline").get_attribute("points").split()
        assert len(points) == int(svg.get_attribute("data-points")) >= 5
        assert svg.find_elements(By.CSS_SELECTOR, "circle.plot-dot")
        md = driver.find_element(By.CSS_SELECTOR, 'article[data-output="insights.md"]')
        assert md.find_element(By.TAG_NAME, "h1").text == "Insights: fixture archive"
        full_page_screenshot(driver, shots / "dashboard-run.png")
        driver.get(url + "/guards")
        marks = driver.find_elements(By.CSS_SELECTOR, "svg#plot-guards rect.plot-mark")
        assert len(marks) >= 3                               # kill, hold, resume
        rows = driver.find_elements(By.CSS_SELECTOR, "table.events tbody tr.act-kill")
        assert any(f"{pop.hot}" in r.text and "91 °C" in r.text for r in rows)
        driver.get(url + "/schedules")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
    rss = _rss_bytes(proc.pid)
    print(f"dashboard: runs page {runs_ms:.0f} ms, run page {run_ms:.0f} ms, RSS {rss / 2**20:.0f} MiB")
    assert (shots / "dashboard-run.png").stat().st_size > 10_000


def _rss_bytes(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss
