"""One validation step for every input: param ranges and dates, submit options, config ranges,
schedule params, params files, strict JSON output, a quiet broken pipe."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.contract.errors import ParamError
from jobs.contract.kinds import Kind, Param, registry, validate_params
from lab_attendant.cli.main import main
from lab_attendant.config import parse_config
from lab_attendant.errors import ConfigError
from lab_attendant.validate import dumps

from ..conftest import ROOT, write_config

RANGED = Kind("r", "m", "h", params=(Param("n", "int", min=1, max=10), Param("f", "float", min=0),
                                     Param("d", "date"), Param("s", "size", min=1)))


@pytest.mark.parametrize("raw, needle", [
    ({"n": "0"}, "'n' must be between 1 and 10, got 0"),
    ({"n": "-3"}, "'n' must be between 1 and 10"),
    ({"n": "11"}, "between 1 and 10"),
    ({"n": 2.5}, "'n' must be an integer"),
    ({"n": True}, "'n' must be an integer"),
    ({"n": "9" * 30}, "between 1 and 10"),
    ({"f": "nan"}, "'f' must be a finite number"),
    ({"f": "inf"}, "'f' must be a finite number"),
    ({"f": "-1"}, "'f' must be at least 0"),
    ({"f": "1e400"}, "'f' must be a finite number"),
    ({"d": "yesterday"}, "'d' must be a date like 2015-01-31"),
    ({"d": "2025-02-31"}, "must be a date"),
    ({"s": "0"}, "'s' must be at least 1"),
])
def test_numbers_are_finite_and_in_their_declared_range(raw, needle):
    with pytest.raises(ParamError) as err:
        validate_params(RANGED, raw, [])
    assert needle in str(err.value)


def test_in_range_values_and_dates_pass():
    assert validate_params(RANGED, {"n": "10", "f": "0", "d": "2015-01-31", "s": "1KiB"}, []) == \
        {"n": 10, "f": 0.0, "d": "2015-01-31", "s": 1024}


def test_builtin_kinds_refuse_the_values_that_used_to_become_defaults(tmp_path: Path):
    kinds = registry()
    for kind, raw in [("nightly_insights", {"max_notes": "0"}), ("nightly_insights", {"max_notes": "-3"}),
                      ("nightly_insights", {"since": "yesterday"}),
                      ("nightly_insights", {"max_new_tokens": "-1"}),
                      ("cv_matching", {"top_k": "0"}), ("cv_matching", {"batch_size": "0"})]:
        req = {"archive": str(tmp_path)} if kind == "nightly_insights" else \
            {"cv": __file__, "postings": str(tmp_path)}
        with pytest.raises(ParamError):
            validate_params(kinds[kind], {**req, **raw}, [tmp_path, Path(__file__).parent])


@pytest.mark.parametrize("data, needle", [
    ({"limits": {"max_concurrent": -1}}, "'limits.max_concurrent' must be >= 1"),
    ({"limits": {"max_concurrent": 0}}, "'limits.max_concurrent' must be >= 1"),
    ({"limits": {"kill_grace_s": -1.0}}, "'limits.kill_grace_s' must be >= 0"),
    ({"limits": {"shutdown_grace_s": -5}}, "'limits.shutdown_grace_s' must be >= 0"),
    ({"limits": {"default_timeout_s": 0}}, "'limits.default_timeout_s' must be > 0"),
    ({"limits": {"default_timeout_s": math.inf}}, "'limits.default_timeout_s' must be > 0"),
    ({"service": {"watchdog_s": math.nan}}, "'service.watchdog_s'"),
    ({"guards": {"thermal_limit_c": math.nan}}, "'guards.thermal_limit_c' must be a finite"),
    ({"worker": {"heartbeat_interval_s": 0}}, "'worker.heartbeat_interval_s' must be > 0"),
    ({"cotenants": {"e": {"unit": "e.service", "release_timeout_s": -1}}},
     "'cotenants.e.release_timeout_s' must be >= 0"),
])
def test_config_ranges_are_checked_at_load(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(data, base_dir=Path("/"), source=None)
    assert needle in str(err.value)


def test_schedule_params_are_confined_and_ranged_at_load(tmp_path: Path):
    def sched(**params):
        return {"paths": {"allowed_roots": [str(tmp_path)]},
                "schedules": [{"id": "n", "cron": "30 2 * * *", "kind": "nightly_insights",
                               "params": params}]}
    src = tmp_path / "lab-attendant.toml"   # relative params resolve against its folder
    with pytest.raises(ConfigError, match="schedule 'n': param 'archive'.*outside the allowed"):
        parse_config(sched(archive="/etc"), base_dir=tmp_path, source=src)
    with pytest.raises(ConfigError, match="schedule 'n': param 'max_notes' must be at least 1"):
        parse_config(sched(archive="notes", max_notes=0), base_dir=tmp_path, source=src)
    # A folder that appears before the first firing is fine at load.
    cfg = parse_config(sched(archive="not-yet"), base_dir=tmp_path, source=src)
    assert cfg.schedules[0].params == {"archive": "not-yet"}


def test_dumps_never_writes_nan_or_infinity():
    text = dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": 2}})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": {"d": 2}}
    assert "NaN" not in text and "Infinity" not in text


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.mark.parametrize("argv, needle", [
    (["submit", "sleepy", "--priority", "9" * 23], "--priority must be"),
    (["submit", "sleepy", "--timeout", "nan"], "--timeout must be"),
    (["submit", "sleepy", "--timeout", "inf"], "--timeout must be"),
    (["submit", "sleepy", "--timeout", "-1"], "--timeout must be a positive number"),
    (["show", "9" * 25], "run id must be a positive integer"),
    (["cancel", "0"], "run id must be a positive integer"),
    (["list", "--limit", "-1"], "--limit must be 0"),
])
def test_submit_options_and_ids_are_checked(cfg_file: Path, argv, needle, capsys):
    assert main(["--config", str(cfg_file), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.parametrize("content, needle", [
    ("[1, 2]", "must hold a JSON object like"),
    ("3", "must hold a JSON object"),
    ("{", "is not a JSON object"),
    ("[" * 100000, "is not a JSON object"),
])
def test_params_file_must_hold_an_object(cfg_file: Path, tmp_path: Path, content, needle, capsys):
    f = tmp_path / "p.json"
    f.write_text(content)
    assert main(["--config", str(cfg_file), "submit", "sleepy", "--params-file", str(f)]) == 2
    assert needle in capsys.readouterr().err


def test_worker_python_must_be_runnable_to_submit(tmp_path: Path, capsys):
    cfg = write_config(tmp_path, python=tmp_path / "no-such-python")
    assert main(["--config", str(cfg), "submit", "sleepy"]) == 2
    assert "worker python" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(cfg_file: Path):
    for _ in range(3):
        assert main(["--config", str(cfg_file), "submit", "sleepy", "--json"]) == 0
    for argv in (["list", "--json"], ["status"], ["list"]):
        proc = subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                                 str(cfg_file), *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
        proc.stdout.close()          # like `| head -0`: the reader is gone before we write
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, err
        assert err == ""
