"""The `command` kind's contract without a daemon: argv checks, program resolution, the environment
allow-list, and which runs count as paging runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.contract.command import MAX_ARGS, child_env, parse_argv, resolve_program
from jobs.contract.errors import ParamError
from jobs.contract.kinds import registry, validate_params


def test_argv_from_a_list_or_its_json_text():
    assert parse_argv(["echo", "a b"]) == ["echo", "a b"]
    assert parse_argv('["echo", "$HOME"]') == ["echo", "$HOME"]


@pytest.mark.parametrize("bad, words", [
    ("echo hi", "JSON list of strings"), ([], "non-empty list"), (["echo", 3], "non-empty list"),
    (["a\0b"], "NUL"), (["x"] * (MAX_ARGS + 1), "at most"), (["x" * 40000], "characters long")])
def test_bad_argv_is_refused_with_a_sentence(bad, words):
    with pytest.raises(ParamError, match=words):
        parse_argv(bad)


def test_the_program_is_resolved_at_submit(tmp_path: Path):
    assert resolve_program(["python3", "-V"], None, True)[0].endswith("/python3")
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ParamError, match="not an executable file"):
        resolve_program(["./run.sh"], tmp_path, True)
    script.chmod(0o755)
    assert resolve_program(["./run.sh", "x"], tmp_path, True) == [str(script), "x"]
    assert resolve_program(["later.sh"], tmp_path, False) == ["later.sh"]   # a schedule at config load


def test_only_allowed_variables_reach_the_program():
    env = child_env({"PATH": "/bin", "LC_ALL": "C", "AWS_SECRET_ACCESS_KEY": "x", "LD_PRELOAD": "/x.so",
                     "PYTHONPATH": "/repo"}, run_id=7, output_dir="/o")
    assert env == {"PATH": "/bin", "LC_ALL": "C", "LAB_ATTENDANT_RUN_ID": "7",
                   "LAB_ATTENDANT_OUTPUT_DIR": "/o"}


def test_gpu_makes_a_command_run_a_paging_run(tmp_path: Path):
    kind = registry()["command"]
    plain = validate_params(kind, {"argv": [sys.executable]}, [tmp_path])
    gpu = validate_params(kind, {"argv": [sys.executable], "gpu": "true", "cwd": str(tmp_path)}, [tmp_path])
    assert not kind.run_needs_paging(plain) and kind.run_needs_paging(gpu)
    assert kind.run_needs_paging({"gpu": "yes"}) and not kind.run_needs_paging({"gpu": "false"})
    assert registry()["generate"].run_needs_paging({})
