"""Sensor samples on a real SQLite store: the sampler's readings, 2:1 thinning that bounds a long
run, the summary `show` prints, deletion with the run, and the [notify]/[metrics] config checks."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from sqlalchemy import delete

from lab_attendant.cli.render import sensors_table
from lab_attendant.config import parse_config
from lab_attendant.errors import ConfigError
from lab_attendant.guards.host import GpuReading
from lab_attendant.store import samples
from lab_attendant.store.db import Store
from lab_attendant.store.samples import RunSample, Sampler
from lab_attendant.store.tables import Run, RunEvent
from tests.unit.fakes import FakeHost


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "store.sqlite3")
    yield s
    s.close()


def _run(store: Store) -> int:
    return store.submit(kind="sleepy", params={}, priority=0, timeout_s=60, needs_paging=False).id


def _rows(run_id: int, temps: list[float], start: float = 1000.0) -> list[RunSample]:
    return [RunSample(run_id=run_id, at=start + i, gpu_temperature_c=t) for i, t in enumerate(temps)]


def test_sampler_takes_the_workers_gpu_and_differentiates_bytes_read():
    host = FakeHost()
    sampler = Sampler(host)
    w = SimpleNamespace(run_id=7, pid=4242, is_local=True)
    guards = SimpleNamespace(
        readings={"workers": {"7": {"rss_bytes": 5 << 20, "gpu_bytes": 3 << 30}}},
        last_gpus=[GpuReading(0, temperature_c=90.0),                 # hotter, but not ours
                   GpuReading(1, temperature_c=70.0, processes={4242: 3 << 30}, power_w=200.0,
                              sm_clock_mhz=1500, throttle_reasons=["HwSlowdown"])])
    sampler.progress(7, 2, 10)
    sampler.metrics(7, {"tokens_per_s": 12.5, "engine_bytes_read": 1000})
    (first,) = sampler.take(100.0, [w], guards)
    assert (first.gpu_index, first.gpu_temperature_c, first.gpu_power_w) == (1, 70.0, 200.0)
    assert first.throttle_reasons == "HwSlowdown" and first.rss_bytes == 5 << 20
    assert (first.progress_done, first.progress_total, first.tokens_per_s) == (2, 10, 12.5)
    assert first.read_bytes_per_s is None                     # no rate from one counter value
    sampler.metrics(7, {"engine_bytes_read": 5000})
    (second,) = sampler.take(102.0, [w], guards)
    assert second.read_bytes_per_s == 2000.0


def test_a_slurm_run_has_no_local_gpu_but_keeps_its_progress():
    """A worker on another node (no local pid) is sampled for what it reports, never for this
    host's GPUs."""
    sampler = Sampler(FakeHost())
    guards = SimpleNamespace(readings={}, last_gpus=[GpuReading(0, temperature_c=80.0)])
    sampler.progress(9, 3, 4)
    (row,) = sampler.take(100.0, [SimpleNamespace(run_id=9, pid=None, is_local=False)], guards)
    assert (row.progress_done, row.progress_total) == (3, 4)
    assert row.gpu_index is None and row.gpu_temperature_c is None and row.throttle_reasons == ""


def test_thinning_keeps_a_long_run_bounded_and_its_ends(store: Store):
    rid = _run(store)
    keep = 40
    for i in range(300):
        samples.save(store, _rows(rid, [60.0 + i % 5], start=1000.0 + i), keep)
    rows = samples.load_from(store, rid)
    assert len(rows) <= keep
    assert rows[-1].at == 1299.0 and rows[0].at == 1000.0          # newest and first kept
    gaps = [b.at - a.at for a, b in zip(rows, rows[1:])]
    assert gaps[0] > gaps[-1] == 1.0                            # old history is coarser


def test_summary_min_max_mean_and_time_above_the_resume_level(store: Store):
    rid = _run(store)
    samples.save(store, _rows(rid, [70.0, 80.0, 86.0, 74.0, 60.0]), 100)
    summary = samples.summarize(samples.load_from(store, rid), resume_below_c=75.0)
    temp = {s.key: s for s in summary.series}["gpu_temperature_c"]
    assert (temp.min, temp.max, temp.mean) == (60.0, 86.0, 74.0)
    assert summary.above_resume_s == 2.0                        # the 80 and 86 °C seconds
    shown = Console(width=120, record=True)          # as `show` renders it
    shown.print(sensors_table(summary))
    assert re.search(r"above 75 °C +2\.0 s", shown.export_text()), shown.export_text()
    assert samples.summarize([], 75.0) is None


def test_samples_go_with_their_run(store: Store):
    rid, other = _run(store), _run(store)
    samples.save(store, _rows(rid, [60.0, 61.0]) + _rows(other, [50.0]), 100)
    with store.write() as s:   # as a prune would: its events first (no cascade there), then it
        s.execute(delete(RunEvent).where(RunEvent.run_id == rid))
        s.execute(delete(Run).where(Run.id == rid))
    assert samples.load_from(store, rid) == []
    assert len(samples.load_from(store, other)) == 1


def _cfg(tmp_path: Path, **sections):
    return parse_config({"worker": {"python": sys.executable}, **sections}, base_dir=tmp_path,
                        source=None)


def test_notify_and_metrics_config_is_checked(tmp_path: Path):
    cfg = _cfg(tmp_path, notify={"command": ["notify-send", "x"]},
               metrics={"textfile": "prom/lab.prom"})
    assert cfg.notify.on == ("failed", "oom", "killed_thermal", "lost")
    assert cfg.metrics.textfile == tmp_path / "prom/lab.prom"
    with pytest.raises(ConfigError, match="unknown end state 'failure'"):
        _cfg(tmp_path, notify={"on": ["failure"], "url": "http://127.0.0.1:1/x"})
    with pytest.raises(ConfigError, match="either command"):
        _cfg(tmp_path, notify={"command": ["true"], "url": "http://127.0.0.1:1/x"})
    with pytest.raises(ConfigError, match="http:// or https://"):
        _cfg(tmp_path, notify={"url": "ftp://example"})
    with pytest.raises(ConfigError, match="notify.command"):
        _cfg(tmp_path, notify={"command": "curl -d x http://h"})   # a shell string, not argv


def test_a_tick_writes_its_readings_and_samples_in_one_transaction(store: Store):
    rid = _run(store)
    samples.save(store, _rows(rid, [61.0]), 100, readings={"at": 5.0, "gpus": []})
    assert store.get_meta("guard_readings") == {"at": 5.0, "gpus": []}
    assert [r.gpu_temperature_c for r in samples.load_from(store, rid)] == [61.0]
    samples.save(store, [], 100, readings={"at": 6.0})        # no run active: readings only
    assert store.get_meta("guard_readings") == {"at": 6.0}


def test_the_runs_peak_rss_and_gpu_memory_outlive_thinning(store: Store):
    rid, other = _run(store), _run(store)
    rss = [300, 900, 200, 400, 100, 500, 100, 200]
    for i, r in enumerate(rss):   # keep=2 thins the early maximum (900) away from the samples
        samples.save(store, [RunSample(run_id=rid, at=1000.0 + i, rss_bytes=r << 20,
                                       gpu_memory_bytes=(i * 10) << 20 if i < 6 else None)], 2)
    samples.save(store, [RunSample(run_id=other, at=1000.0, gpu_temperature_c=50.0)], 2)
    kept = [s.rss_bytes for s in samples.load_from(store, rid)]
    assert 900 << 20 not in kept
    run = store.must_get(rid)
    assert (run.peak_rss_bytes, run.peak_gpu_bytes) == (900 << 20, 50 << 20)
    assert run.to_dict()["peak_rss_bytes"] == 900 << 20
    assert (store.must_get(other).peak_rss_bytes, store.must_get(other).peak_gpu_bytes) == (None, None)
