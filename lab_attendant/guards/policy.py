"""Guard policy: GPU temperature, host RAM, worker RSS and per-worker GPU memory -> actions.

Pure decisions over readings from the host seam; the daemon carries the actions out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from jobs.contract.units import format_size
from lab_attendant.config import GuardsConfig
from lab_attendant.guards.host import GpuReading, SensorsFailed, SensorsUnavailable
from lab_attendant.store.states import Hold, RunState

OOM_KILLER_NEAR = 0.9        # RSS at >= 90 % of its limit counts as "near" for the hint


@dataclass(frozen=True)
class WorkerInfo:
    run_id: int
    pid: int                 # leader of the worker's process group
    needs_paging: bool


class GuardAction(str, Enum):
    """What a guard asks the daemon to do (stored as its value in guard_events.action)."""
    KILL = "kill"            # stop the run (Action.state says how it ends)
    HOLD = "hold"            # paging runs may not start
    RESUME = "resume"        # the hold is lifted
    UNAVAILABLE = "unavailable"

    def __str__(self) -> str:
        return self.value


@dataclass
class Action:
    guard: str               # "thermal" | "host_ram" | "worker_rss" | "worker_vram" | "sensors"
    action: GuardAction
    reason: str
    run_id: int | None = None
    state: RunState | None = None
    reading: dict[str, Any] = field(default_factory=dict)


def thermal_hold(limit_c: float, resume_c: float) -> Hold:
    return Hold("thermal", f"thermal cooldown: a GPU went above {limit_c:g} °C; paging runs wait "
                f"until every GPU is below {resume_c:g} °C")


class Guards:
    def __init__(self, cfg: GuardsConfig, host, sensors) -> None:
        self.cfg = cfg
        self.host = host
        self.sensors = sensors
        self.thermal_hold: Hold | None = None
        self.sensors_hold: Hold | None = None     # sensors that had answered have failed
        self._blind_since: float | None = None
        self.readings: dict[str, Any] = {}
        self.last_gpus: list[GpuReading] | None = None
        self._unavailable_reported = False
        self._acted_on: set[int] = set()          # run ids already given a kill decision
        self._last_rss: dict[int, int] = {}
        self._last_available = None

    @property
    def hold(self) -> Hold | None:
        """Why paging runs may not start, as far as the guards know."""
        return self.thermal_hold or self.sensors_hold

    def read_gpus(self) -> tuple[list[GpuReading] | None, str | None, bool]:
        """(readings, why not, whether sensors that had answered have failed)."""
        try:
            return self.sensors.read(), None, False
        except SensorsFailed as exc:
            return None, str(exc), True
        except SensorsUnavailable as exc:
            return None, str(exc), False
        except Exception as exc:  # noqa: BLE001 - a sensor bug must cost readings, not the daemon
            return None, f"sensor read failed ({type(exc).__name__}: {exc})", True

    def _sensors_lost(self, failed: bool, why: str | None, workers: list[WorkerInfo]) -> list[Action]:
        """Blind thermal guard: hold paging at once; stop running paging workers after the grace."""
        if not failed:
            if self.sensors_hold is None:
                return []
            self.sensors_hold, self._blind_since = None, None
            return [Action("sensors", GuardAction.RESUME, "GPU sensors answer again; paging runs may start")]
        out = []
        if self.sensors_hold is None:
            self._blind_since = self.host.monotonic()
            self.sensors_hold = Hold("sensors", f"GPU sensors failed ({why}); paging runs wait until "
                                     "they answer again")
            out.append(Action("sensors", GuardAction.HOLD, self.sensors_hold.reason))
        if self.host.monotonic() - self._blind_since >= self.cfg.sensors_lost_grace_s:
            out += [Action("sensors", GuardAction.KILL,
                           f"GPU sensors failed {self.cfg.sensors_lost_grace_s:g} s ago ({why}): the "
                           f"{self.cfg.thermal_limit_c:g} °C limit cannot be enforced; paging run "
                           "stopped", w.run_id, RunState.FAILED)
                    for w in workers if w.needs_paging and w.run_id not in self._acted_on]
        return out

    def poll(self, workers: list[WorkerInfo]) -> list[Action]:
        actions: list[Action] = []
        gpus, why, failed = self.read_gpus()
        self.last_gpus = gpus
        actions += self._sensors_lost(failed, why, workers)
        if gpus is None and not failed and not self._unavailable_reported:
            self._unavailable_reported = True
            actions.append(Action("sensors", GuardAction.UNAVAILABLE,
                                  f"GPU guards unavailable: {why}; host guards keep working"))
        if gpus:
            actions += self._thermal(gpus, workers)
        rss = {w.run_id: self.host.rss_tree_bytes(w.pid) for w in workers}
        available = self.host.available_ram_bytes()
        # 0 means the tree is already gone (e.g. a zombie not yet reaped): keep the last real one.
        self._last_rss.update({k: v for k, v in rss.items() if v})
        self._last_available = available
        actions += self._memory(workers, rss, available)
        vram = self._worker_vram(gpus, workers) if gpus else {}
        actions += self._vram(workers, vram)
        self.readings = {
            "gpus": [g.to_dict() for g in gpus] if gpus else None,
            "gpu_unavailable": why,
            "available_ram_bytes": available,
            "workers": {str(w.run_id): {"rss_bytes": rss.get(w.run_id),
                                        "gpu_bytes": vram.get(w.run_id)} for w in workers},
            "thermal_hold": self.thermal_hold and self.thermal_hold.reason,
        }
        for a in actions:
            if a.action is GuardAction.KILL and a.run_id is not None:
                self._acted_on.add(a.run_id)
        return actions

    def _thermal(self, gpus: list[GpuReading], workers: list[WorkerInfo]) -> list[Action]:
        c = self.cfg
        temps = [g for g in gpus if g.temperature_c is not None]
        hot = [g for g in temps if _celsius(g) > c.thermal_limit_c]
        out: list[Action] = []
        if hot:
            g = max(hot, key=_celsius)
            reading = g.to_dict()
            for w in workers:
                if w.needs_paging and w.run_id not in self._acted_on:
                    why = (f"killed: GPU {g.index} at {g.temperature_c:.0f} °C > "
                           f"{c.thermal_limit_c:g} °C limit")
                    if g.throttle_reasons:
                        why += f" (throttling: {', '.join(g.throttle_reasons)})"
                    out.append(Action("thermal", GuardAction.KILL, why, w.run_id, RunState.KILLED_THERMAL,
                                      reading))
            if self.thermal_hold is None:
                self.thermal_hold = thermal_hold(c.thermal_limit_c, c.resume_below_c)
                out.append(Action("thermal", GuardAction.HOLD,
                                  f"GPU {g.index} at {g.temperature_c:.0f} °C: {self.thermal_hold.reason}",
                                  reading=reading))
        elif self.thermal_hold and temps and all(_celsius(g) < c.resume_below_c for g in temps):
            self.thermal_hold = None
            hottest = max(temps, key=_celsius)
            out.append(Action("thermal", GuardAction.RESUME,
                              f"every GPU below {c.resume_below_c:g} °C (hottest "
                              f"{hottest.temperature_c:.0f} °C); paging admissions resume",
                              reading=hottest.to_dict()))
        return out

    def _memory(self, workers: list[WorkerInfo], rss: dict[int, int], available: int) -> list[Action]:
        c = self.cfg
        out: list[Action] = []
        live = [w for w in workers if w.run_id not in self._acted_on]
        if c.max_worker_rss_bytes:
            for w in live:
                if rss[w.run_id] > c.max_worker_rss_bytes:
                    out.append(Action(
                        "worker_rss", GuardAction.KILL,
                        f"worker RSS {format_size(rss[w.run_id])} > {format_size(c.max_worker_rss_bytes)}"
                        " limit ([guards] max_worker_rss_bytes)", w.run_id, RunState.OOM,
                        {"rss_bytes": rss[w.run_id]}))
        killed = {a.run_id for a in out}
        rest = [w for w in live if w.run_id not in killed]
        if c.min_available_ram_bytes and available < c.min_available_ram_bytes and rest:
            # One at a time, the largest first: the next poll sees whether that was enough.
            w = max(rest, key=lambda x: rss[x.run_id])
            out.append(Action(
                "host_ram", GuardAction.KILL,
                f"host available RAM {format_size(available)} < "
                f"{format_size(c.min_available_ram_bytes)} floor; stopped the largest worker "
                f"({format_size(rss[w.run_id])} RSS)", w.run_id, RunState.OOM,
                {"available_ram_bytes": available, "rss_bytes": rss[w.run_id]}))
        return out

    def _worker_vram(self, gpus: list[GpuReading], workers: list[WorkerInfo]) -> dict[int, int]:
        out = {}
        for w in workers:
            pids = self.host.tree_pids(w.pid)
            out[w.run_id] = sum(b for g in gpus for p, b in g.processes.items() if p in pids)
        return out

    def _vram(self, workers: list[WorkerInfo], vram: dict[int, int]) -> list[Action]:
        c = self.cfg
        if not c.vram_budget_bytes:
            return []
        limit = c.vram_budget_bytes + c.vram_margin_bytes
        return [Action("worker_vram", GuardAction.KILL,
                       f"worker GPU memory {format_size(vram[w.run_id])} > "
                       f"{format_size(c.vram_budget_bytes)} budget + "
                       f"{format_size(c.vram_margin_bytes)} margin", w.run_id, RunState.OOM,
                       {"gpu_bytes": vram[w.run_id]})
                for w in workers
                if w.run_id not in self._acted_on and vram.get(w.run_id, 0) > limit]

    def memory_evidence(self, run_id: int) -> tuple[bool, int | None]:
        """For a worker SIGKILLed by someone else: (was memory near a limit?, its last tree RSS)."""
        rss = self._last_rss.get(run_id)
        c = self.cfg
        near = bool(
            (rss and c.max_worker_rss_bytes and rss >= OOM_KILLER_NEAR * c.max_worker_rss_bytes)
            or (self._last_available is not None and c.min_available_ram_bytes
                and self._last_available < 2 * c.min_available_ram_bytes))
        return near, rss

    def forget(self, run_id: int) -> None:
        self._acted_on.discard(run_id)
        self._last_rss.pop(run_id, None)


def _celsius(reading: GpuReading) -> float:
    """The temperature of a reading that has one (callers filter out those without)."""
    assert reading.temperature_c is not None
    return reading.temperature_c
