"""Per-run sensor history (the run_samples table, lab_attendant.store.tables.RunSample): the sampler the daemon calls once per guard
tick, the 2:1 thinning that bounds it, and the min/max/mean summary `show` prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from jobs.contract.units import format_size
from lab_attendant.store.db import Store
from lab_attendant.store.tables import GUARD_READINGS, Meta, Run, RunSample

# Column, label, unit ("bytes" and "bytes/s" are printed as sizes). The order is the one `show`
# and the dashboard use.
SERIES: tuple[tuple[str, str, str], ...] = (
    ("gpu_temperature_c", "GPU temperature", "°C"),
    ("gpu_power_w", "GPU power", "W"),
    ("gpu_sm_clock_mhz", "SM clock", "MHz"),
    ("gpu_memory_bytes", "GPU memory (worker)", "bytes"),
    ("rss_bytes", "worker tree RSS", "bytes"),
    ("progress_done", "progress done", ""),
    ("tokens_per_s", "tokens/s", "tok/s"),
    ("read_bytes_per_s", "bytes read/s", "bytes/s"),
)
# Cumulative byte counters a worker may report in its metric events; their rate is the read rate.
READ_COUNTERS = ("engine_bytes_read", "engine_disk_read_bytes", "bytes_read")


@dataclass
class _RunState:
    """What the worker told us about one run since its last sample."""
    done: int | None = None
    total: int | None = None
    tokens_per_s: float | None = None
    read_rate: float | None = None             # reported directly (e.g. probe's read_bytes_per_s)
    read_bytes: int | None = None              # a cumulative counter, differentiated per sample
    last: tuple[float, int] | None = None      # (time, read_bytes) at the previous sample


class Sampler:
    """Turns the guards' readings and what the worker reported (its progress and metric events,
handed over by lab_attendant.daemon.events) into one RunSample per active run."""

    def __init__(self, host) -> None:
        self.host = host
        self._runs: dict[int, _RunState] = {}

    def progress(self, run_id: int, done: int | None, total: int | None) -> None:
        st = self._runs.setdefault(run_id, _RunState())
        st.done, st.total = done, total

    def metrics(self, run_id: int, metrics: Mapping[str, Any]) -> None:
        """The rates and counters it samples, from a metric event (values already checked by
        jobs.contract.protocol; a non-number under one of these names is ignored)."""
        st = self._runs.setdefault(run_id, _RunState())
        if (tps := as_float(metrics.get("tokens_per_s"))) is not None:
            st.tokens_per_s = tps
        if (rate := as_float(metrics.get("read_bytes_per_s"))) is not None:
            st.read_rate = rate
        for key in READ_COUNTERS:
            if (count := as_float(metrics.get(key))) is not None:
                st.read_bytes = int(count)
                break

    def take(self, now: float, workers: Iterable[Any], guards) -> list[RunSample]:
        """One sample per run (handles with run_id, pid and is_local) from `guards`' last poll."""
        out = []
        readings = guards.readings.get("workers") or {}
        for w in workers:
            st = self._runs.setdefault(w.run_id, _RunState())
            mine = readings.get(str(w.run_id)) or {}
            # A worker with no local pid (a Slurm job) runs on another node: this host's GPU
            # readings say nothing about it; its progress and rates still do.
            gpu = self._gpu_of(w.pid, guards.last_gpus or []) if w.is_local else None
            rate = st.read_rate
            if st.read_bytes is not None:
                if st.last is not None and now > st.last[0]:
                    rate = max(0.0, (st.read_bytes - st.last[1]) / (now - st.last[0]))
                st.last = (now, st.read_bytes)
            out.append(RunSample(
                run_id=w.run_id, at=now, gpu_index=gpu and gpu.index,
                gpu_temperature_c=gpu and gpu.temperature_c, gpu_power_w=gpu and gpu.power_w,
                gpu_sm_clock_mhz=gpu and gpu.sm_clock_mhz,
                throttle_reasons=",".join(gpu.throttle_reasons) if gpu else "",
                gpu_memory_bytes=mine.get("gpu_bytes"), rss_bytes=mine.get("rss_bytes") or None,
                progress_done=st.done, progress_total=st.total, tokens_per_s=st.tokens_per_s,
                read_bytes_per_s=rate))
        return out

    def _gpu_of(self, pid: int, gpus: list) -> Any:
        """The hottest GPU the worker's tree uses; the hottest of all when it uses none (yet)."""
        if not gpus:
            return None
        pids = self.host.tree_pids(pid)
        used = [g for g in gpus if pids & set(g.processes)] or gpus
        return max(used, key=lambda g: -math.inf if g.temperature_c is None else g.temperature_c)

    def forget(self, run_id: int) -> None:
        self._runs.pop(run_id, None)


def save(store: Store, rows: list[RunSample], keep_per_run: int,
         readings: dict[str, Any] | None = None) -> None:
    """Insert one tick's samples, with the guard readings they came from (meta guard_readings,
    what `status` shows) in the same transaction: sampling costs the daemon no extra commit. A
    run past keep_per_run has every second one of its oldest half deleted, so old history gets
    coarser while the total stays bounded."""
    if not rows and readings is None:
        return
    with store.write() as s:
        if readings is not None:
            s.merge(Meta.of(GUARD_READINGS, readings))
        s.add_all(rows)
        s.flush()
        for r in rows:   # the peaks outlive thinning: kept on the run, in this same transaction
            if r.rss_bytes is not None or r.gpu_memory_bytes is not None:
                s.execute(update(Run).where(Run.id == r.run_id).values(
                    peak_rss_bytes=_peak(Run.peak_rss_bytes, r.rss_bytes),
                    peak_gpu_bytes=_peak(Run.peak_gpu_bytes, r.gpu_memory_bytes)))
        for run_id in {r.run_id for r in rows}:
            thin(s, run_id, keep_per_run)


def _peak(column: Any, reading: int | None) -> Any:
    """SQL for the larger of the run's peak so far and this reading (the column when none)."""
    return column if reading is None else func.max(func.coalesce(column, reading), reading)


def thin(s: Session, run_id: int, keep: int) -> int:
    count = s.scalar(select(func.count()).where(RunSample.run_id == run_id)) or 0
    if count <= keep:
        return 0
    oldest = list(s.scalars(select(RunSample.id).where(RunSample.run_id == run_id)
                            .order_by(RunSample.at, RunSample.id).limit(count // 2)))
    doomed = oldest[1::2]
    s.query(RunSample).filter(RunSample.id.in_(doomed)).delete(synchronize_session=False)
    return len(doomed)


def load(s: Session, run_id: int) -> list[RunSample]:
    return list(s.scalars(select(RunSample).where(RunSample.run_id == run_id)
                          .order_by(RunSample.at, RunSample.id)))


def load_from(store: Store, run_id: int) -> list[RunSample]:
    with store.read() as s:
        return load(s, run_id)


@dataclass(frozen=True)
class SeriesStats:
    key: str
    label: str
    unit: str
    count: int
    min: float
    max: float
    mean: float

    def text(self) -> str:
        f = formatter(self.unit)
        return f"min {f(self.min)}  max {f(self.max)}  mean {f(self.mean)}"


@dataclass(frozen=True)
class Summary:
    samples: int
    span_s: float
    series: list[SeriesStats]
    above_resume_s: float | None          # time the GPU spent above the thermal resume level
    resume_below_c: float
    throttle_reasons: list[str]           # distinct reasons seen

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "span_s": self.span_s,
                "series": {s.key: {"label": s.label, "unit": s.unit, "count": s.count,
                                   "min": s.min, "max": s.max, "mean": s.mean}
                           for s in self.series},
                "above_resume_s": self.above_resume_s, "resume_below_c": self.resume_below_c,
                "throttle_reasons": self.throttle_reasons}


def summarize(rows: list[RunSample], resume_below_c: float) -> Summary | None:
    if not rows:
        return None
    stats = []
    for key, label, unit in SERIES:
        values = [float(v) for v in (getattr(r, key) for r in rows) if v is not None]
        if values:
            stats.append(SeriesStats(key, label, unit, len(values), min(values), max(values),
                                     sum(values) / len(values)))
    above: float | None = None
    temps = [(r.at, r.gpu_temperature_c) for r in rows if r.gpu_temperature_c is not None]
    if temps:   # each sample stands for the time until the next one
        above = sum(t1 - t0 for (t0, c), (t1, _) in zip(temps, temps[1:]) if c > resume_below_c)
    reasons = sorted({x for r in rows for x in (r.throttle_reasons or "").split(",") if x})
    return Summary(len(rows), rows[-1].at - rows[0].at, stats, above, resume_below_c, reasons)


def as_float(v: Any) -> float | None:
    """A reported value as a float, or None for a missing or non-numeric one (bools included)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def formatter(unit: str) -> Callable[[float], str]:
    """How a person reads a value of this unit: sizes for bytes, else the number and unit."""
    if unit == "bytes":
        return format_size
    if unit == "bytes/s":
        return lambda v: format_size(v) + "/s"
    return lambda v: f"{v:.1f} {unit}".rstrip()
