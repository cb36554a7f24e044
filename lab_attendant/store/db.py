"""The SQLite run store: opens (and migrates) the tables of lab_attendant.store.tables and offers the
operations on runs, events, guards and the daemon heartbeat; transition() is the one place that
changes a run's state (through lab_attendant.store.lifecycle). WAL, busy_timeout, synchronous=FULL; writes in BEGIN IMMEDIATE.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import URL, create_engine, event, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from lab_attendant.errors import StoreError, TransitionError
from lab_attendant.store.faults import translate
from lab_attendant.store.lifecycle import must_get, new_run, ready, transition
from lab_attendant.store.states import ACTIVE, WAITING, RunState
from lab_attendant.store.tables import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    Base,
    CotenantRow,
    DaemonRow,
    GuardEvent,
    Meta,
    Run,
    RunEvent,
)

BUSY_TIMEOUT_MS = 60_000


def _make_engine(db_path: Path) -> Engine:
    # a URL object, not "sqlite:///PATH": a '?' or '#' in the path would be read as the URL's own
    engine = create_engine(URL.create("sqlite", database=str(db_path)),
                           connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001 - DBAPI hook signature
        # Let SQLAlchemy's "begin" hook emit BEGIN itself (the pysqlite default defers it).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout instead
        # of one failing with "database is locked" when it upgrades a read lock.
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class Store:
    """Opens (creating if needed) the store at db_path and offers the operations the daemon and
    the CLI need; every method is one short transaction."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = db_path
        self.engine = _make_engine(db_path)
        with self._translated():
            self._init_schema()

    @contextmanager
    def _translated(self, *, writing: bool = True) -> Iterator[None]:
        """SQLite's errors as ours: StoreUnusable (damaged file), StoreWriteError or
        StoreReadError (full, I/O, read-only)."""
        try:
            yield
        except DatabaseError as exc:
            err = translate(exc, self.db_path, writing=writing)
            if err is exc:
                raise
            raise err from exc

    def close(self) -> None:
        self.engine.dispose()

    def _init_schema(self) -> None:
        with self.engine.begin() as conn:
            Base.metadata.create_all(conn)
            row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).first()
            if row is None:
                conn.execute(insert(Meta).values(key="schema_version",
                                                            value=str(SCHEMA_VERSION)))
                return
            version = int(row[0])
            while version in _MIGRATIONS and version < SCHEMA_VERSION:
                columns = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(runs)")}
                for statement in _MIGRATIONS[version]:
                    words = statement.split()
                    if words[:4] == ["ALTER", "TABLE", "runs", "ADD"] and words[5] in columns:
                        continue   # created by create_all above (a store that never had runs)
                    conn.exec_driver_sql(statement)
                version += 1
                conn.execute(update(Meta).where(Meta.key == "schema_version")
                             .values(value=str(version)))
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.db_path} has schema version {row[0]}, this lab-attendant "
                    f"understands {SCHEMA_VERSION}; use a matching version or a new state_dir"
                )

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A BEGIN IMMEDIATE transaction; commits on success."""
        with self._translated(), Session(self.engine, expire_on_commit=False) as session, \
                session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._translated(writing=False):
            conn = self.engine.connect().execution_options(sqlite_begin="DEFERRED")
            try:
                with Session(conn, expire_on_commit=False) as session, session.begin():
                    yield session
            finally:
                conn.close()

    # -- runs ---------------------------------------------------------------------------------
    def submit(self, *, kind: str, params: dict[str, Any], priority: int, timeout_s: float,
               needs_paging: bool, schedule_id: str | None = None,
               reason: str = "submitted", skip_reason: str | None = None,
               max_retries: int = 0, name: str | None = None, after: Iterable[int] = (),
               executor: str = "local", not_before: float | None = None,
               after_any: Iterable[int] = (), after_notok: Iterable[int] = (),
               singleton: bool = False, notify: str | None = None) -> Run:
        """Insert a queued run; with skip_reason it is skipped in the same transaction, so no
        reader (and no crash) ever sees a skipped firing as queued."""
        with self.write() as s:
            run = new_run(s, kind=kind, params_json=json.dumps(params, sort_keys=True),
                          priority=priority, timeout_s=timeout_s, needs_paging=needs_paging,
                          reason=reason, schedule_id=schedule_id, max_retries=max_retries,
                          name=name, after=after, executor=executor, not_before=not_before,
                          after_any=after_any, after_notok=after_notok, singleton=singleton,
                          notify=notify)
            if skip_reason is not None:
                transition(s, run, RunState.SKIPPED, skip_reason)
        return run

    def open_run_of_schedule(self, schedule_id: str) -> Run | None:
        """The oldest run of this schedule that is waiting or active, if any."""
        with self.read() as s:
            return s.scalars(select(Run).where(Run.schedule_id == schedule_id,
                                               Run.state.in_(WAITING | ACTIVE))
                             .order_by(Run.id).limit(1)).first()

    def get(self, run_id: int) -> Run | None:
        with self.read() as s:
            return s.get(Run, run_id)

    def must_get(self, run_id: int) -> Run:
        """`get` for an id a person typed: a UserError that says what to do when there is none."""
        with self.read() as s:
            return must_get(s, run_id)

    def list_runs(self, *, states: Iterable[RunState] = (), limit: int | None = None,
                  oldest_first: bool = False) -> list[Run]:
        q = select(Run)
        states = list(states)
        if states:
            q = q.where(Run.state.in_(states))
        q = q.order_by(Run.id if oldest_first else Run.id.desc())
        if limit:
            q = q.limit(limit)
        with self.read() as s:
            return list(s.scalars(q))

    def events(self, run_id: int) -> list[RunEvent]:
        with self.read() as s:
            return list(s.scalars(select(RunEvent).where(RunEvent.run_id == run_id)
                                  .order_by(RunEvent.id)))

    def transition(self, run_id: int, dst: RunState, reason: str, *,
                   expect: set[RunState] | None = None, **fields: Any) -> Run | None:
        """Move a run to `dst`, recording `reason` and setting `fields` in the same transaction.

        With `expect`, a run not in one of those states is left alone and None is returned (a
        claim lost to a race, a cancel of a finished run); otherwise a disallowed move raises.
        """
        with self.write() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise TransitionError(f"run {run_id} does not exist")
            if expect is not None and run.state not in expect:
                return None
            transition(s, run, dst, reason, **fields)
            return run

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Non-state bookkeeping (progress, metrics, heartbeat, result path)."""
        if {"state", "hold_code", "reason"} & fields.keys():
            raise TransitionError("state changes go through transition() (state, hold_code, reason)")
        with self.write() as s:
            s.execute(update(Run).where(Run.id == run_id).values(**fields))

    def merge_metrics(self, run_id: int, metrics: dict[str, Any]) -> None:
        """Fold a worker's metric event into the run's metrics: read and write in one transaction,
        so a concurrent reader never sees a half-merged state and the daemon pays one commit."""
        with self.write() as s:
            run = s.get(Run, run_id)
            if run is not None:
                run.metrics_json = json.dumps({**run.metrics, **metrics}, default=str)

    def add_event(self, run_id: int, kind: str, reason: str) -> None:
        with self.write() as s:
            s.add(RunEvent(run_id=run_id, at=time.time(), kind=kind, reason=reason))

    def request_cancel(self, run_id: int) -> Run | None:
        """Waiting runs are cancelled at once; active ones are flagged for the daemon."""
        with self.write() as s:
            run = s.get(Run, run_id)
            if run is None:
                return None
            run.cancel_requested = True
        run = self.transition(run_id, RunState.CANCELLED, "cancelled by user before it started",
                              expect={RunState.QUEUED, RunState.HELD})
        return run or self.get(run_id)

    def claim_next(self, *, exclude_paging: bool) -> Run | None:
        """Atomically take the highest-priority, oldest queued run whose dependencies are all
        met, and mark it STARTING; they are checked in the same transaction (lifecycle.ready)."""
        with self.write() as s:
            q = select(Run).where(Run.state == RunState.QUEUED,
                                  Run.not_before.is_(None) | (Run.not_before <= time.time()))
            if exclude_paging:
                q = q.where(Run.needs_paging.is_(False))
            for run in s.scalars(q.order_by(Run.priority.desc(), Run.id)):
                if ready(s, run):
                    transition(s, run, RunState.STARTING, "claimed by daemon")
                    return run
            return None

    def count_by_state(self) -> dict[RunState, int]:
        with self.read() as s:
            return {st: n for st, n in s.execute(select(Run.state, func.count()).group_by(Run.state))}

    # -- guards and co-tenants -------------------------------------------------------------------
    def add_guard_event(self, *, guard: str, action: str, reason: str, run_id: int | None = None,
                        reading: dict[str, Any] | None = None) -> None:
        with self.write() as s:
            s.add(GuardEvent(at=time.time(), guard=guard, action=action, run_id=run_id,
                             reason=reason, reading_json=json.dumps(reading or {}, default=str)))

    def guard_events(self, *, run_id: int | None = None, limit: int = 50) -> list[GuardEvent]:
        q = select(GuardEvent)
        if run_id is not None:
            q = q.where(GuardEvent.run_id == run_id)
        with self.read() as s:
            return list(reversed(list(s.scalars(q.order_by(GuardEvent.id.desc()).limit(limit)))))

    def set_cotenant(self, name: str, suspended: bool, note: str) -> None:
        with self.write() as s:
            s.merge(CotenantRow(name=name, suspended=suspended, changed_at=time.time(), note=note))

    def cotenants(self) -> list[CotenantRow]:
        with self.read() as s:
            return list(s.scalars(select(CotenantRow).order_by(CotenantRow.name)))

    def set_meta(self, key: str, value: Any) -> None:
        with self.write() as s:
            s.merge(Meta.of(key, value))

    def get_meta(self, key: str) -> Any:
        with self.read() as s:
            return Meta.read(s, key)

    # -- daemon heartbeat ---------------------------------------------------------------------
    def daemon_started(self, *, pid: int, hostname: str, experimental_paging: bool) -> int:
        now = time.time()
        with self.write() as s:
            row = DaemonRow(pid=pid, hostname=hostname, experimental_paging=experimental_paging,
                            started_at=now, heartbeat_at=now)
            s.add(row)
            s.flush()
            return row.id

    def daemon_heartbeat(self, daemon_id: int, *, stopped: bool = False) -> None:
        now = time.time()
        values: dict[str, Any] = {"heartbeat_at": now}
        if stopped:
            values["stopped_at"] = now
        with self.write() as s:
            s.execute(update(DaemonRow).where(DaemonRow.id == daemon_id).values(**values))

    def latest_daemon(self) -> DaemonRow | None:
        with self.read() as s:
            return s.scalars(select(DaemonRow).order_by(DaemonRow.id.desc()).limit(1)).first()

