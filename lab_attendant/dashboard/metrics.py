"""Prometheus metrics built from the store (prometheus_client): one collector that reads runs,
guard events, co-tenants and the guard readings at each scrape. The dashboard serves it at
/metrics; the daemon writes it as a node_exporter textfile ([metrics] textfile).
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lab_attendant.config import MetricsConfig
from lab_attendant.service.logsetup import get_logger
from lab_attendant.store.samples import as_float
from lab_attendant.store.states import TERMINAL, RunState
from lab_attendant.store.tables import GUARD_READINGS, CotenantRow, GuardEvent, Meta, Run

log = get_logger("lab_attendant.dashboard.metrics")

# Seconds: from a minute to a long night.
DURATION_BUCKETS_S = (10, 30, 60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600)
SessionFactory = Callable[[], AbstractContextManager[Session]]


class StoreCollector(Collector):
    """Every value is read from the store at collect time: nothing lives in this process, so the
    read-only dashboard and the daemon export the same numbers."""

    def __init__(self, session: SessionFactory) -> None:
        self.session = session

    def collect(self) -> Iterator[Metric]:
        with self.session() as s:
            yield from self._runs(s)
            yield from self._durations(s)
            yield from self._tokens(s)
            yield from self._guards(s)

    def _runs(self, s: Session) -> Iterator[Metric]:
        ended = CounterMetricFamily("lab_attendant_runs", "Runs that ended, by kind and end state",
                                    labels=["kind", "state"])
        counts = {st: 0 for st in RunState}
        for kind, state, n in s.execute(select(Run.kind, Run.state, func.count())
                                        .group_by(Run.kind, Run.state)):
            counts[state] += n
            if state in TERMINAL:
                ended.add_metric([kind, state.value], n)
        yield ended
        for name, state, text in (("queue_depth", RunState.QUEUED, "Runs queued"),
                                  ("runs_held", RunState.HELD, "Runs held (waiting on a guard, "
                                   "the paging flag or a co-tenant)"),
                                  ("runs_running", RunState.RUNNING, "Runs running")):
            yield GaugeMetricFamily(f"lab_attendant_{name}", text, value=counts[state])

    def _durations(self, s: Session) -> Iterator[Metric]:
        h = HistogramMetricFamily("lab_attendant_run_duration_seconds",
                                  "Wall time of ended runs, from worker start to end",
                                  labels=["kind"])
        per_kind: dict[str, list[float]] = {}
        for kind, started, ended in s.execute(
                select(Run.kind, Run.started_at, Run.ended_at)
                .where(Run.started_at.is_not(None), Run.ended_at.is_not(None))):
            if started is not None and ended is not None:   # (the query's WHERE; typed Optional)
                per_kind.setdefault(kind, []).append(max(0.0, ended - started))
        for kind, values in sorted(per_kind.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS_S]
            h.add_metric([kind], buckets + [("+Inf", len(values))], sum_value=sum(values))
        yield h

    def _tokens(self, s: Session) -> Iterator[Metric]:
        g = GaugeMetricFamily("lab_attendant_last_run_tokens_per_second",
                              "Generated tokens/s of the newest succeeded run of each kind",
                              labels=["kind"])
        newest = select(func.max(Run.id)).where(Run.state == RunState.SUCCEEDED).group_by(Run.kind)
        for run in s.scalars(select(Run).where(Run.id.in_(newest))):
            tps = as_float(run.metrics.get("tokens_per_s"))
            if tps is not None:
                g.add_metric([run.kind], tps)
        yield g

    def _guards(self, s: Session) -> Iterator[Metric]:
        kills = CounterMetricFamily("lab_attendant_guard_kills",
                                    "Workers stopped by a guard, by reason (the guard)",
                                    labels=["reason"])
        for guard, n in s.execute(select(GuardEvent.guard, func.count())
                                  .where(GuardEvent.action == "kill").group_by(GuardEvent.guard)):
            kills.add_metric([guard], n)
        yield kills
        sus = GaugeMetricFamily("lab_attendant_cotenant_suspended",
                                "1 while the co-tenant is suspended for paging runs",
                                labels=["cotenant"])
        for row in s.scalars(select(CotenantRow)):
            sus.add_metric([row.name], 1.0 if row.suspended else 0.0)
        yield sus
        temp = GaugeMetricFamily("lab_attendant_gpu_temperature_celsius",
                                 "GPU temperature at the guard's last reading", labels=["gpu"])
        at = GaugeMetricFamily("lab_attendant_guard_reading_timestamp_seconds",
                               "Unix time of the guard's last reading")
        readings = Meta.read(s, GUARD_READINGS)
        if readings:
            at.add_metric([], float(readings.get("at") or 0))
            for gpu in readings.get("gpus") or []:
                if gpu.get("temperature_c") is not None:
                    temp.add_metric([str(gpu["index"])], float(gpu["temperature_c"]))
        yield temp
        yield at


def registry_for(session: SessionFactory) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(session))
    return reg


def exposition(session: SessionFactory) -> bytes:
    return generate_latest(registry_for(session))


class Textfile:
    """The daemon's node_exporter textfile: rewritten atomically (tmp + rename, by
    prometheus_client) every textfile_interval_s and when a run ends."""

    def __init__(self, cfg: MetricsConfig, store_read: SessionFactory) -> None:
        self.cfg = cfg
        self.registry = registry_for(store_read)
        self._last = float("-inf")

    def tick(self, now_mono: float) -> None:
        if now_mono - self._last >= self.cfg.textfile_interval_s:
            self._last = now_mono
            self.write()

    def write(self) -> None:
        path = self.cfg.textfile
        if path is None:
            return   # no [metrics] textfile configured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(path), self.registry)
            # node_exporter reads it as its own user; our umask 077 would make it 0600
            os.chmod(path, 0o644)
        except Exception as exc:  # noqa: BLE001 - metrics are a view; never stop the daemon
            log.warning("cannot write the metrics textfile", path=str(self.cfg.textfile),
                        error=f"{type(exc).__name__}: {exc}")
