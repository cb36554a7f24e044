"""The guard policy over a fake host and fake sensors: thresholds, hysteresis, ordering."""
from __future__ import annotations

import pytest

from lab_attendant.config import GuardsConfig
from lab_attendant.guards.host import GpuReading
from lab_attendant.guards.policy import Guards, WorkerInfo
from lab_attendant.store.states import RunState
from tests.unit.fakes import FakeHost, FakeSensors

GiB = 1024**3
PAGING, PLAIN = WorkerInfo(1, 100, True), WorkerInfo(2, 200, False)


def _guards(**cfg) -> tuple[Guards, FakeHost, FakeSensors]:
    host, sensors = FakeHost(), FakeSensors()
    host.rss = {100: GiB, 200: 2 * GiB}
    return Guards(GuardsConfig(**cfg), host, sensors), host, sensors


def _temp(sensors: FakeSensors, *temps: float) -> None:
    sensors.gpus = [GpuReading(index=i, temperature_c=t) for i, t in enumerate(temps)]


def test_thermal_kill_hits_paging_workers_only_once_and_holds_with_hysteresis():
    g, _host, s = _guards(thermal_limit_c=85, resume_below_c=75)
    _temp(s, 60, 70)
    assert g.poll([PAGING, PLAIN]) == [] and g.thermal_hold is None
    _temp(s, 60, 91)
    actions = g.poll([PAGING, PLAIN])
    kills = [a for a in actions if a.action == "kill"]
    assert [(a.run_id, a.state) for a in kills] == [(1, RunState.KILLED_THERMAL)]
    assert "GPU 1 at 91 °C > 85 °C limit" in kills[0].reason
    assert [a.action for a in actions] == ["kill", "hold"] and g.thermal_hold
    assert [a.action for a in g.poll([PAGING, PLAIN])] == []     # no second kill, no second hold
    _temp(s, 60, 80)                                             # below the limit, above resume
    assert g.poll([PLAIN]) == [] and g.thermal_hold
    _temp(s, 60, 74)
    assert [a.action for a in g.poll([PLAIN])] == ["resume"] and g.thermal_hold is None
    _temp(s, 86)                                                 # a new paging run: killed again
    g.forget(1)
    assert [a.run_id for a in g.poll([PAGING]) if a.action == "kill"] == [1]


def test_exactly_at_the_limit_is_not_over_it():
    g, _host, s = _guards(thermal_limit_c=85)
    _temp(s, 85.0)
    assert g.poll([PAGING]) == []


def test_throttle_reasons_go_into_the_reason():
    g, _host, s = _guards()
    s.gpus = [GpuReading(index=0, temperature_c=92, throttle_reasons=["HwThermalSlowdown"])]
    kill = g.poll([PAGING])[0]
    assert "throttling: HwThermalSlowdown" in kill.reason


def test_unavailable_sensors_are_reported_once_and_host_guards_still_work():
    g, host, s = _guards(max_worker_rss_bytes=int(1.5 * GiB))
    s.gpus = None
    first = g.poll([PAGING, PLAIN])
    assert [(a.guard, a.action) for a in first] == [("sensors", "unavailable"),
                                                    ("worker_rss", "kill")]
    assert first[1].run_id == 2 and first[1].state is RunState.OOM
    assert g.poll([PAGING, PLAIN]) == []


def test_host_ram_floor_stops_the_largest_worker_first_one_per_poll():
    g, host, s = _guards(min_available_ram_bytes=GiB)
    host.available_ram = GiB // 2
    a = g.poll([PAGING, PLAIN])
    assert [(x.guard, x.run_id) for x in a] == [("host_ram", 2)]
    a = g.poll([PAGING, PLAIN])                  # still short: the next largest
    assert [(x.guard, x.run_id) for x in a] == [("host_ram", 1)]
    host.available_ram = 4 * GiB
    g2, _h, _s = _guards(min_available_ram_bytes=GiB)
    assert g2.poll([PAGING, PLAIN]) == []


def test_vram_budget_counts_the_workers_whole_process_tree():
    g, _host, s = _guards(vram_budget_bytes=GiB, vram_margin_bytes=GiB // 4)
    s.gpus = [GpuReading(index=0, temperature_c=50, processes={100: GiB, 101: GiB // 2, 999: 9 * GiB})]
    a = g.poll([PAGING])
    assert [(x.guard, x.run_id) for x in a] == [("worker_vram", 1)]
    assert "1.5 GiB > 1.0 GiB budget" in a[0].reason


def test_memory_evidence_is_near_a_limit_only_near_a_limit():
    g, host, s = _guards(max_worker_rss_bytes=10 * GiB, min_available_ram_bytes=0)
    g.poll([PAGING])
    assert g.memory_evidence(1) == (False, GiB)
    host.rss[100] = int(9.5 * GiB)
    g.poll([PAGING])
    assert g.memory_evidence(1) == (True, int(9.5 * GiB))
    host.rss[100] = 0                           # gone before the reap: keep the last reading
    g.poll([PAGING])
    assert g.memory_evidence(1) == (True, int(9.5 * GiB))


def test_nvml_init_failures_are_retried_with_back_off_not_cached_for_good():
    from lab_attendant.guards.host import NvmlSensors, SensorsFailed, SensorsUnavailable
    from tests.unit.fakes import FakeNvml
    host, nv = FakeHost(), FakeNvml()
    nv.no_driver = True
    sensors = NvmlSensors(nv, clock=host.monotonic)
    for wait_s in (1.0, 2.0, 4.0):
        with pytest.raises(SensorsUnavailable, match="DriverNotLoaded") as err:
            sensors.read()
        assert not isinstance(err.value, SensorsFailed)   # never answered: no GPU, not a lost one
        inits = nv.inits
        host.advance(wait_s - 0.1)
        with pytest.raises(SensorsUnavailable):
            sensors.read()
        assert nv.inits == inits                          # still backing off
        host.advance(0.1)
    nv.no_driver = False
    assert sensors.read()[0].temperature_c == 60.0        # the driver came: readings


def test_a_lost_gpu_holds_paging_then_stops_paging_workers_and_recovers():
    from lab_attendant.guards.host import NvmlSensors
    from tests.unit.fakes import FakeNvml
    host, nv = FakeHost(), FakeNvml()
    host.rss = {100: GiB, 200: GiB}
    g = Guards(GuardsConfig(sensors_lost_grace_s=30.0), host, NvmlSensors(nv, clock=host.monotonic))
    assert g.poll([PAGING, PLAIN]) == [] and g.hold is None
    nv.lost = True
    actions = g.poll([PAGING, PLAIN])
    assert [(a.guard, a.action) for a in actions] == [("sensors", "hold")]
    assert g.hold.code == "sensors" and "NVMLError_GpuIsLost" in g.hold.reason
    host.advance(29.0)
    assert g.poll([PAGING, PLAIN]) == []                  # within the grace: held, not stopped
    host.advance(1.0)
    kills = g.poll([PAGING, PLAIN])
    assert [(a.run_id, a.action, a.state) for a in kills] == [(1, "kill", RunState.FAILED)]
    assert "85 °C limit cannot be enforced" in kills[0].reason
    nv.lost = False
    host.advance(60.0)                                    # past any back-off
    assert [a.action for a in g.poll([PLAIN])] == ["resume"] and g.hold is None
    assert g.last_gpus[0].temperature_c == 60.0
