"""Nightly schedules: next fire times and the APScheduler wiring in the daemon (the config's
schedules are checked at load by lab_attendant.validate.check_schedules).

The scheduler thread only puts firings on a queue; the daemon's loop drains it and writes the store.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from jobs.contract.errors import ParamError
from jobs.contract.kinds import Kind, check_with_model, validate_params
from lab_attendant import cron
from lab_attendant.errors import ConfigError
from lab_attendant.plan import model_facts
from lab_attendant.service.logsetup import get_logger, log_for

if TYPE_CHECKING:
    from lab_attendant.config import Config, ScheduleConfig
    from lab_attendant.store.db import Store
    from lab_attendant.store.tables import Run

log = get_logger("lab_attendant.scheduler")


def parse_cron(expr: str, timezone: str = "") -> BaseTrigger:
    """A trigger with standard crontab semantics (lab_attendant.cron): 5 fields (minute first),
    6 (a seconds field first) or a macro such as @daily."""
    return cron.trigger(expr, timezone)


def next_fire_times(cfg: "Config", now: datetime | None = None) -> list[tuple["ScheduleConfig",
                                                                              datetime | None]]:
    """Each schedule with its next fire time after `now`, from the trigger alone (no scheduler)."""
    now = now or datetime.now(dt_timezone.utc)
    return [(s, parse_cron(s.cron, s.timezone).get_next_fire_time(None, now))
            for s in cfg.schedules]


@dataclass(frozen=True)
class Firing:
    schedule_id: str
    fired_at: float           # wall clock when APScheduler ran the job


class Schedules:
    """Owns the BackgroundScheduler (in-memory job store) and turns its firings into runs."""

    def __init__(self, cfg: "Config", kinds: dict[str, Kind]) -> None:
        self.cfg, self.kinds = cfg, kinds
        self.by_id = {s.id: s for s in cfg.schedules}
        self.firings: queue.SimpleQueue[Firing] = queue.SimpleQueue()
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        if not self.by_id:
            return
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1})
        for s in self.by_id.values():
            self._scheduler.add_job(self._fire, parse_cron(s.cron, s.timezone), args=(s.id,),
                                    id=s.id, misfire_grace_time=int(max(1, s.misfire_grace_s)))
        self._scheduler.start()
        log.info("schedules started", schedules=sorted(self.by_id))

    def _fire(self, schedule_id: str) -> None:
        # Runs on the scheduler's thread: no store access here, the daemon loop drains the queue.
        self.firings.put(Firing(schedule_id, time.time()))

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def dispatch(self, store: "Store", experimental_paging: bool) -> list["Run"]:
        """Drain pending firings (daemon thread): each becomes a queued run or a skipped one."""
        runs: list["Run"] = []
        while True:
            try:
                firing = self.firings.get_nowait()
            except queue.Empty:
                return runs
            runs.append(self._submit(store, firing, experimental_paging))

    def fire_now(self, store: "Store", schedule_id: str) -> "Run":
        """`schedules run ID`: the run a firing would make, now. A paging kind is queued (not
        skipped) whatever the daemon's flag: a daemon without it holds the run and says why."""
        if schedule_id not in self.by_id:
            known = ", ".join(sorted(self.by_id)) or "none configured"
            raise ConfigError(f"no schedule '{schedule_id}'; schedules: {known}")
        return self._submit(store, Firing(schedule_id, time.time()), experimental_paging=True,
                            by_hand=True)

    def _submit(self, store: "Store", firing: Firing, experimental_paging: bool,
                by_hand: bool = False) -> "Run":
        s = self.by_id[firing.schedule_id]
        kind = self.kinds[s.kind]
        fired = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(firing.fired_at))
        skip = None
        params: dict[str, Any] = {}
        if kind.run_needs_paging(s.params) and not experimental_paging:
            skip = ("experimental paging is off; start the daemon with --experimental-paging "
                    "so this schedule can run")
        else:
            prev = store.open_run_of_schedule(s.id)
            if prev is not None:
                skip = f"previous run {prev.id} of this schedule is still {prev.state}"
        if skip is None:
            try:
                params = validate_params(kind, s.params, self.cfg.allowed_roots,
                                         base_dir=self.cfg.base_dir)
                if any(p.name == "model" for p in kind.params):   # as submit checks them
                    check_with_model(kind, params,
                                     model_facts(Path(self.cfg.model_spec(params.get("model")).path)))
            except (ParamError, ConfigError) as exc:
                skip = f"bad params in the config: {exc}"
                params = {}
        run = store.submit(kind=kind.name, params=params or dict(s.params), priority=0,
                           timeout_s=self.cfg.limits.default_timeout_s,
                           needs_paging=kind.run_needs_paging(params or s.params), schedule_id=s.id,
                           max_retries=self.cfg.retries_for(kind.name, s),
                           executor=self.cfg.executor.choose(kind.name, params.get("model")),
                           reason=f"fired by schedule '{s.id}' at {fired}"
                           + (" by hand (`schedules run`)" if by_hand else ""),
                           skip_reason=None if skip is None else
                           f"schedule '{s.id}' fired at {fired}; skipped: {skip}")
        rlog = log_for(run.needs_paging, "lab_attendant.scheduler").bind(run_id=run.id,
                                                                          schedule=s.id)
        if skip is not None:
            rlog.info("schedule firing skipped", reason=skip)
        else:
            rlog.info("schedule fired", kind=kind.name)
        return run
