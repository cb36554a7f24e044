"""The store's tables (SQLAlchemy ORM over SQLite) and the schema version with its in-place
migrations; lab_attendant.store.db opens them and holds the operations."""
from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy import DDL, Boolean, Enum, Float, ForeignKey, Index, Integer, String, Text, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from lab_attendant.store.states import RunState

SCHEMA_VERSION = 6


class WorkerInt(TypeDecorator):
    """An INTEGER a worker reported (progress): read back as an int in SQLite's range, or None. Rows an
    older version stored before events were typed at decode (TEXT, 1e30, a float) must not crash a view."""
    impl = Integer
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        value = int(value)
        return value if -2**63 <= value < 2**63 else None


def worker_json(text: str | None) -> dict[str, Any]:
    """A JSON object a worker's events filled (metrics): {} when unreadable, non-finite numbers as None."""
    try:
        value = json.loads(text or "{}")
    except (ValueError, RecursionError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in value.items()}
# Stored as the enum's values ("queued", ...), in a plain VARCHAR: version-1 rows read unchanged.
_STATE_COLUMN = Enum(RunState, native_enum=False, create_constraint=False, length=20,
                     values_callable=lambda states: [s.value for s in states])
_MIGRATIONS = {1: ["ALTER TABLE runs ADD COLUMN hold_code VARCHAR"],   # from version -> to +1
               2: ["ALTER TABLE runs ADD COLUMN retry_of INTEGER",
                   "ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
                   "ALTER TABLE runs ADD COLUMN max_retries INTEGER NOT NULL DEFAULT 0",
                   "ALTER TABLE runs ADD COLUMN not_before FLOAT",
                   "CREATE INDEX IF NOT EXISTS ix_runs_retry_of ON runs (retry_of)"],
               3: ["ALTER TABLE runs ADD COLUMN name VARCHAR",
                   "ALTER TABLE runs ADD COLUMN after_json TEXT NOT NULL DEFAULT '[]'",
                   "ALTER TABLE runs ADD COLUMN executor VARCHAR NOT NULL DEFAULT 'local'",
                   "ALTER TABLE runs ADD COLUMN executor_job_id VARCHAR",
                   "CREATE INDEX IF NOT EXISTS ix_runs_name ON runs (name)"],
               # runs pruned before this version may have their ids handed out once more
               4: ["INSERT OR REPLACE INTO meta (key, value) SELECT 'run_id_high_water', "
                   "CAST(coalesce(max(id), 0) AS TEXT) FROM runs"]}

# Run ids are never reused, even after `prune` deleted the newest runs: a trigger keeps the
# highest id ever inserted in meta, and a new run takes the next one (SQLite alone would take
# max(id) + 1, giving a new run the old one's logs/runs/ID.log and dashboard links).
RUN_ID_HIGH_WATER = "run_id_high_water"
_HIGH_WATER = (f"coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = "
               f"'{RUN_ID_HIGH_WATER}'), 0)")
_HIGH_WATER_TRIGGER = DDL(
    "CREATE TRIGGER IF NOT EXISTS runs_id_high_water AFTER INSERT ON runs "
    f"WHEN NEW.id > {_HIGH_WATER} BEGIN INSERT OR REPLACE INTO meta (key, value) "
    f"VALUES ('{RUN_ID_HIGH_WATER}', CAST(NEW.id AS TEXT)); END")
_MIGRATIONS[4].insert(0, str(_HIGH_WATER_TRIGGER.statement))
_MIGRATIONS[5] = ["ALTER TABLE runs ADD COLUMN progress_phase VARCHAR",
                  "ALTER TABLE runs ADD COLUMN peak_rss_bytes INTEGER",
                  "ALTER TABLE runs ADD COLUMN peak_gpu_bytes INTEGER",
                  "ALTER TABLE runs ADD COLUMN after_any_json TEXT NOT NULL DEFAULT '[]'",
                  "ALTER TABLE runs ADD COLUMN after_notok_json TEXT NOT NULL DEFAULT '[]'",
                  "ALTER TABLE runs ADD COLUMN singleton BOOLEAN NOT NULL DEFAULT 0",
                  "ALTER TABLE runs ADD COLUMN notify VARCHAR"]


def _next_run_id(context: Any) -> int:
    return context.connection.exec_driver_sql(
        f"SELECT max(coalesce((SELECT max(id) FROM runs), 0), {_HIGH_WATER}) + 1").scalar()


class Base(DeclarativeBase):
    pass


GUARD_READINGS = "guard_readings"   # meta key: the guards' last readings, as `status` shows them


class Meta(Base):
    """Small named values, stored as JSON (schema_version, guard_readings, tailer offsets)."""
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)

    @classmethod
    def of(cls, key: str, value: Any) -> "Meta":
        """The row that stores `value`; merge() it into a session to set the key."""
        return cls(key=key, value=json.dumps(value, default=str))

    @staticmethod
    def read(s: Any, key: str) -> Any:
        """The value stored under `key` in session `s`, None when there is none."""
        row = s.get(Meta, key)
        return json.loads(row.value) if row else None


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, default=_next_run_id)
    kind: Mapped[str] = mapped_column(String, index=True)
    params_json: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[RunState] = mapped_column(_STATE_COLUMN, index=True, default=RunState.QUEUED)
    reason: Mapped[str] = mapped_column(Text, default="")
    hold_code: Mapped[str | None] = mapped_column(String, nullable=True)  # Hold.code while held
    priority: Mapped[int] = mapped_column(Integer, default=0)
    needs_paging: Mapped[bool] = mapped_column(Boolean, default=False)
    timeout_s: Mapped[float] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    submitted_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)   # worker spawned
    running_at: Mapped[float | None] = mapped_column(Float, nullable=True)   # `started` event
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_create_time: Mapped[float | None] = mapped_column(Float, nullable=True)  # vs pid reuse
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    signal: Mapped[str | None] = mapped_column(String, nullable=True)
    run_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress_done: Mapped[int | None] = mapped_column(WorkerInt, nullable=True)
    progress_total: Mapped[int | None] = mapped_column(WorkerInt, nullable=True)
    progress_unit: Mapped[str | None] = mapped_column(String, nullable=True)
    progress_phase: Mapped[str | None] = mapped_column(String, nullable=True)  # "reading notes"
    # The highest worker-tree RSS and GPU memory the guards read while the run was active (the
    # samples are thinned, so their maximum is not kept there; sacct's MaxRSS).
    peak_rss_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    peak_gpu_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    schedule_id: Mapped[str | None] = mapped_column(String, nullable=True, index=True)
    # Retries (lab_attendant.store.retry): the run this one retries, its attempt number (1 = first),
    # how many retries its chain may make, and the earliest time it may be admitted (back-off).
    retry_of: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A user's label (`submit --name`), the runs this one waits on (afterok, a JSON list of ids),
    # where its worker runs ("local" or "slurm") and that executor's id for it (a Slurm job id).
    name: Mapped[str | None] = mapped_column(String, nullable=True, index=True)
    after_json: Mapped[str] = mapped_column(Text, default="[]")
    executor: Mapped[str] = mapped_column(String, default="local")
    executor_job_id: Mapped[str | None] = mapped_column(String, nullable=True)
    # The other dependency types (`--afterany`, `--afternotok`: JSON lists of ids), `--singleton`
    # (not started while another run of its name is active) and `--notify` (end, fail or all).
    after_any_json: Mapped[str] = mapped_column(Text, default="[]")
    after_notok_json: Mapped[str] = mapped_column(Text, default="[]")
    singleton: Mapped[bool] = mapped_column(Boolean, default=False)
    notify: Mapped[str | None] = mapped_column(String, nullable=True)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def metrics(self) -> dict[str, Any]:
        return worker_json(self.metrics_json)

    @property
    def after(self) -> list[int]:
        return json.loads(self.after_json)

    @property
    def after_any(self) -> list[int]:
        return json.loads(self.after_any_json)

    @property
    def after_notok(self) -> list[int]:
        return json.loads(self.after_notok_json)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "state": self.state, "reason": self.reason,
            "params": self.params, "priority": self.priority, "needs_paging": self.needs_paging,
            "timeout_s": self.timeout_s, "cancel_requested": self.cancel_requested,
            "pid": self.pid, "exit_code": self.exit_code, "signal": self.signal,
            "submitted_at": self.submitted_at, "started_at": self.started_at,
            "running_at": self.running_at, "ended_at": self.ended_at,
            "log_path": self.log_path, "result_path": self.result_path, "run_dir": self.run_dir,
            "progress": {"done": self.progress_done, "total": self.progress_total,
                         "unit": self.progress_unit, "phase": self.progress_phase},
            "peak_rss_bytes": self.peak_rss_bytes, "peak_gpu_bytes": self.peak_gpu_bytes,
            "metrics": self.metrics, "heartbeat_at": self.heartbeat_at,
            "schedule_id": self.schedule_id, "retry_of": self.retry_of, "attempt": self.attempt,
            "max_retries": self.max_retries, "not_before": self.not_before,
            "name": self.name, "after": self.after, "executor": self.executor,
            "executor_job_id": self.executor_job_id, "after_any": self.after_any,
            "after_notok": self.after_notok, "singleton": self.singleton, "notify": self.notify,
        }


event.listen(Run.__table__, "after_create", _HIGH_WATER_TRIGGER)


class RunEvent(Base):
    __tablename__ = "run_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String)        # "transition" or a worker event name
    from_state: Mapped[str | None] = mapped_column(String, nullable=True)
    to_state: Mapped[str | None] = mapped_column(String, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "from": self.from_state, "to": self.to_state,
                "reason": self.reason}


class DaemonRow(Base):
    """One row per daemon start; `status` reads the newest to tell whether one is alive."""
    __tablename__ = "daemons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pid: Mapped[int] = mapped_column(Integer)
    hostname: Mapped[str] = mapped_column(String)
    experimental_paging: Mapped[bool] = mapped_column(Boolean)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class GuardEvent(Base):
    """A guard's or co-tenant's action: kills, holds, resumes, suspensions, failures."""
    __tablename__ = "guard_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    guard: Mapped[str] = mapped_column(String)        # thermal, host_ram, worker_rss, cotenant:NAME
    action: Mapped[str] = mapped_column(String)       # kill, hold, resume, stop, suspended, ...
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    reason: Mapped[str] = mapped_column(Text)
    reading_json: Mapped[str] = mapped_column(Text, default="{}")

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "guard": self.guard, "action": self.action, "run_id": self.run_id,
                "reason": self.reason, "reading": json.loads(self.reading_json)}


class CotenantRow(Base):
    """Persisted suspension: a daemon that starts and finds suspended=True restores it."""
    __tablename__ = "cotenants"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    suspended: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[float] = mapped_column(Float)
    note: Mapped[str] = mapped_column(Text, default="")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "suspended": self.suspended, "changed_at": self.changed_at,
                "note": self.note}


class RunSample(Base):
    """One reading of a run while it is active; deleted with its run (ON DELETE CASCADE)."""
    __tablename__ = "run_samples"
    __table_args__ = (Index("ix_run_samples_run_at", "run_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    at: Mapped[float] = mapped_column(Float)                      # unix time
    gpu_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gpu_temperature_c: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_power_w: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_sm_clock_mhz: Mapped[float | None] = mapped_column(Float, nullable=True)
    throttle_reasons: Mapped[str] = mapped_column(String, default="")   # comma-separated
    gpu_memory_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rss_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_done: Mapped[int | None] = mapped_column(WorkerInt, nullable=True)
    progress_total: Mapped[int | None] = mapped_column(WorkerInt, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    read_bytes_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns
                if c.name not in ("id", "run_id")}
