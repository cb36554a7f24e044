"""The dashboard's only way into the store: SQLite opened read-only (`file:PATH?mode=ro` plus
`PRAGMA query_only`), never through Store, which creates and migrates.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from lab_attendant.errors import UserError
from lab_attendant.store.db import BUSY_TIMEOUT_MS
from lab_attendant.store.tables import SCHEMA_VERSION, Meta


def connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A connection that cannot write: SQLite refuses with "attempt to write a readonly
    database". In WAL mode it reads the daemon's -wal/-shm; where they do not exist (no daemon
    has the store open) SQLite creates the two empty side files, never the database itself."""
    conn = sqlite3.connect(f"file:{quote(str(db_path.resolve()))}?mode=ro", uri=True,
                           timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.execute("PRAGMA query_only=ON")
    return conn


def open_readonly(db_path: Path) -> Engine:
    if not db_path.is_file():
        raise UserError(f"no store at {db_path} yet: start the daemon or submit a run first "
                        "(the dashboard only reads a store, it never creates one), or pass the "
                        "daemon's --config")
    engine = create_engine("sqlite://", creator=lambda: connect_readonly(db_path),
                           poolclass=NullPool)
    try:
        with Session(engine) as s:
            row = s.execute(select(Meta.value).where(Meta.key == "schema_version")).first()
    except OperationalError as exc:
        raise UserError(f"cannot read the store {db_path} ({exc.orig}); in WAL mode a reader needs "
                        f"the -wal/-shm files beside it, which SQLite creates in {db_path.parent} "
                        "when no daemon has them: run the dashboard as the daemon's user, or "
                        "while the daemon runs") from None
    if row is None or int(row[0]) != SCHEMA_VERSION:
        raise UserError(f"store {db_path} has schema version {row and row[0]}, this dashboard "
                        f"reads {SCHEMA_VERSION}; start this version's daemon once to migrate it")
    return engine


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as s:
        yield s
