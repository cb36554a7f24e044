"""Fixtures shared by the unit tests: `loop` makes real Daemons around fakes (tests.unit.fakes)
and closes them after the test."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab_attendant.daemon.loop import Daemon
from tests.unit.fakes import make_daemon


@pytest.fixture
def loop(tmp_path: Path):
    made: list[Daemon] = []

    def make(**kw: Any):
        d, launcher, sensors = make_daemon(tmp_path, **kw)
        made.append(d)
        return d, launcher, sensors
    yield make
    for d in made:
        d.close()
