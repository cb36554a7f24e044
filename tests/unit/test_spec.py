"""The run spec contract: dataclass -> JSON -> dataclass, strict on unknown/missing/mistyped keys,
and a worker given a bad spec exits "bad spec" with a sentence (a real worker subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from jobs.contract import protocol
from jobs.contract.errors import SpecError
from jobs.contract.spec import SPEC_VERSION, ModelSettings, ModelSpec, RunSpec
from lab_attendant import PROJECT_ROOT
from lab_attendant.config import parse_config


def _spec(tmp_path: Path, **over) -> RunSpec:
    cfg = parse_config({"models": {"big": {"vram_budget_bytes": "2GiB", "dtype": "fp16",
                                           "ram_budget_bytes": 1000, "kv_cache": "int8"}}},
                       base_dir=tmp_path, source=None)
    fields = dict(version=SPEC_VERSION, run_id=7, kind="cv_matching", module="jobs.kinds.cv_matching",
                  function="run", params={"cv": "/x/cv.md", "top_k": 3, "flag": True},
                  needs_paging=True, run_dir=str(tmp_path / "r"), output_dir=str(tmp_path / "r/o"),
                  state_dir=str(tmp_path), models_dir=str(tmp_path / "m"), logs_dir=str(tmp_path),
                  heartbeat_interval_s=5.0, model=cfg.model_spec("big"))
    return RunSpec(**{**fields, **over})


def test_spec_round_trips_through_json(tmp_path: Path):
    spec = _spec(tmp_path)
    back = RunSpec.from_json(spec.to_json())
    assert back == spec and isinstance(back.model, ModelSpec)
    assert back.model.vram_budget_bytes == 2 * 1024**3 and back.model.dtype == "fp16"
    assert RunSpec.from_json(replace(spec, model=None).to_json()).model is None
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    assert RunSpec.read(path) == spec


def test_model_spec_takes_every_setting_and_its_defaults_from_one_place(tmp_path: Path):
    cfg = parse_config({}, base_dir=tmp_path, source=None)
    default = cfg.model_spec(None)
    names = {f for f in ModelSettings.__dataclass_fields__}
    assert names <= set(default.__dataclass_fields__)
    # Every setting not overridden by the embedded model's table is ModelSettings' default.
    assert default.settings() == {**ModelSettings().settings(),
                                  "vram_budget_bytes": 16 * 1024**2}


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(surprise=1), "unknown spec key 'surprise'"),
    (lambda d: d.pop("output_dir"), "spec key 'output_dir' is required"),
    (lambda d: d["model"].update(colour="red"), "unknown spec key 'model.colour'"),
    (lambda d: d["model"].pop("path"), "spec key 'model.path' is required"),
    (lambda d: d["model"].update(dtype="fp8"), "spec key 'model.dtype' must be one of"),
    (lambda d: d.update(run_id="7"), "spec key 'run_id' must be an integer"),
    (lambda d: d.update(needs_paging=1), "spec key 'needs_paging' must be true or false"),
    (lambda d: d.update(params=[]), "spec key 'params' must be a table"),
    (lambda d: d.update(version=99), "spec version 99 is not"),
])
def test_spec_rejects_unknown_missing_and_mistyped_keys(tmp_path: Path, mutate, needle):
    data = json.loads(_spec(tmp_path).to_json())
    mutate(data)
    with pytest.raises(SpecError) as err:
        RunSpec.from_json(json.dumps(data))
    assert needle in str(err.value)


@pytest.mark.parametrize("content, needle", [
    ('{"version": 2, "run_id": 1}', "spec key 'kind' is required"),
    ("not json", "spec is not valid JSON"),
])
def test_worker_exits_bad_spec_with_a_sentence(tmp_path: Path, content, needle):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(content)
    r_fd, w_fd = os.pipe()
    env = {**os.environ, protocol.EVENT_FD_ENV: str(w_fd),
           "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobs.worker", str(spec_path)], env=env,
                          pass_fds=[w_fd], capture_output=True, text=True, timeout=60)
    os.close(w_fd)
    with os.fdopen(r_fd, "rb") as f:
        events = [protocol.decode(line) for line in f.read().splitlines()]
    assert proc.returncode == protocol.EXIT_BAD_SPEC
    assert needle in proc.stderr
    assert events and isinstance(events[-1], protocol.WorkerError) and needle in events[-1].message
