"""Size-based rotation (daemon only), rotated paging output still readable, journald console."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab_attendant.config import parse_config
from lab_attendant.errors import ConfigError
from lab_attendant.service.logsetup import (
    MAIN_LOG,
    PAGING_LOG,
    PAGING_LOGGER,
    RunOutput,
    get_logger,
    read_run_log,
    rotated_files,
    setup_logging,
)


@pytest.fixture
def restore_logging():
    saved = {n: list(logging.getLogger(n).handlers) for n in ("lab_attendant", PAGING_LOGGER)}
    yield
    for name, handlers in saved.items():
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        for h in handlers:
            logger.addHandler(h)


def test_daemon_rotation_keeps_at_most_n_files_of_at_most_m_bytes(tmp_path, restore_logging):
    setup_logging(tmp_path, console=False, max_bytes=2000, backup_count=2)
    log = get_logger("lab_attendant.daemon.loop")
    for i in range(200):
        log.info("tick", i=i, pad="x" * 40)
    out = RunOutput(tmp_path, run_id=7, needs_paging=True)
    for i in range(40):
        out.write_lines([f"paging-echo line {i}".encode() for _ in range(5)])
    out.close()
    for name in (MAIN_LOG, PAGING_LOG):
        files = rotated_files(tmp_path / name)
        assert [p.name for p in files] == [f"{name}.2", f"{name}.1", name]
        assert all(p.stat().st_size <= 2000 for p in files), [p.stat().st_size for p in files]
    # The newest lines survive, across rotated files, oldest first; the oldest were dropped.
    lines = read_run_log(tmp_path, 7, needs_paging=True)
    assert lines[-1] == "paging-echo line 39" and 0 < len(lines) < 200
    assert lines == sorted(lines, key=lambda s: int(s.split()[-1]))
    assert '"i": 199' in (tmp_path / MAIN_LOG).read_text()


def test_cli_logging_appends_and_never_rotates(tmp_path, restore_logging):
    setup_logging(tmp_path, console=False)              # what every non-daemon verb does
    log = get_logger("lab_attendant.cli.main")
    for i in range(200):
        log.info("submitted", i=i, pad="x" * 40)
    assert rotated_files(tmp_path / MAIN_LOG) == [tmp_path / MAIN_LOG]
    assert (tmp_path / MAIN_LOG).stat().st_size > 10_000


@pytest.mark.parametrize("env, prefix, has_time", [({}, "", True),
                                                    ({"INVOCATION_ID": "abc"}, "<4>", False),
                                                    ({"JOURNAL_STREAM": "8:123"}, "<4>", False)])
def test_console_lines_under_journald_drop_the_timestamp(tmp_path, env, prefix, has_time):
    code = ("import sys; from pathlib import Path; from lab_attendant.service.logsetup import *; "
            "setup_logging(Path(sys.argv[1]), console=True); "
            "get_logger('lab_attendant.daemon.loop').warning('disk is slow', mb_s=12)")
    clean = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, env={**clean, **env}, check=True)
    line = proc.stderr.strip()
    assert line.startswith(prefix) and "disk is slow" in line and "mb_s=12" in line, line
    assert bool(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line)) == has_time, line


def test_logging_config_keys_are_checked():
    cfg = parse_config({"logging": {"max_bytes": 4096, "backup_count": 3}}, base_dir=Path("/x"),
                       source=None)
    assert (cfg.logging.max_bytes, cfg.logging.backup_count) == (4096, 3)
    with pytest.raises(ConfigError, match="backup_count must be 1 or more"):
        parse_config({"logging": {"backup_count": 0}}, base_dir=Path("/x"), source=None)
    with pytest.raises(ConfigError, match="unknown config key 'logging.max_size'"):
        parse_config({"logging": {"max_size": 1}}, base_dir=Path("/x"), source=None)
