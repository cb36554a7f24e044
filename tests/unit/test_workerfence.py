"""What a worker may write (lab_attendant.executors.workerfence) from a real config: the folders
its launcher is given, the state it keeps between runs, and the ones it is never given."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from jobs.contract.kinds import registry
from jobs.contract.sandbox import landlock_abi
from lab_attendant.config import parse_config
from lab_attendant.daemon.runspec import build_spec
from lab_attendant.executors.workerfence import WorkerFence, move_legacy_worker_state


def _cfg(tmp_path: Path, **worker):
    return parse_config({"paths": {"state_dir": "lab/var"}, "worker": worker}, base_dir=tmp_path,
                        source=None)


def test_a_writable_path_that_holds_the_state_folder_is_never_given(tmp_path: Path):
    cfg = _cfg(tmp_path, writable_paths=[str(tmp_path / "lab"), str(tmp_path / "scratch")])
    fence = WorkerFence.for_config(cfg)
    assert tmp_path / "scratch" in fence.shared_writable
    assert tmp_path / "lab" not in fence.shared_writable
    assert cfg.worker_state_dir.absolute() not in fence.shared_writable   # a folder per kind, its own only
    run_dir = cfg.runs_dir / "7"
    argv = fence.prefix("/usr/bin/python3", run_dir)
    if landlock_abi()[0]:
        assert argv[:3] == ["/usr/bin/python3", "-m", "jobs.contract.sandbox"]
        assert argv[argv.index("--rw") + 1] == str(run_dir.absolute()) and argv[-1] == "--"
    else:
        assert argv == []
    remote = fence.prefix("/usr/bin/python3", run_dir, remote=True)
    assert "--if-available" in remote            # a Slurm node's kernel is probed there


def test_sandbox_false_gives_no_launcher_and_names_what_is_missing(tmp_path: Path):
    fence = WorkerFence.for_config(_cfg(tmp_path, sandbox=False))
    assert not fence.enabled and "sandbox = false" in fence.missing
    assert fence.prefix("py", tmp_path) == [] and fence.prefix("py", tmp_path, remote=True) == []
    assert json.dumps(fence.describe())          # stored in the store's meta for `status`


def test_worker_state_kept_in_the_state_folder_moves_to_its_kinds_folder_once(tmp_path: Path):
    state, worker = tmp_path / "var", tmp_path / "var" / "worker"
    (state / "insights" / "abc").mkdir(parents=True)
    (state / "insights" / "abc" / "manifest.json").write_text("{}")
    (state / "generate" / "k1").mkdir(parents=True)
    (state / "read_bandwidth.json").write_text('{"1": {}}')
    assert move_legacy_worker_state(state, worker) == ["insights", "generate", "read_bandwidth.json"]
    assert (worker / "nightly_insights" / "insights" / "abc" / "manifest.json").read_text() == "{}"
    assert (worker / "generate" / "k1").is_dir() and (worker / "probe" / "read_bandwidth.json").exists()
    assert not (state / "insights").exists() and (worker / "probe").stat().st_mode & 0o777 == 0o700
    assert move_legacy_worker_state(state, worker) == []


def test_worker_state_an_older_version_shared_between_kinds_moves_to_each_kinds_folder(tmp_path: Path):
    state, worker = tmp_path / "var", tmp_path / "var" / "worker"
    (worker / "insights" / "abc").mkdir(parents=True)
    (worker / "generate" / "k1").mkdir(parents=True)
    (worker / "read_bandwidth.json").write_text('{"1": {}}')
    assert move_legacy_worker_state(state, worker) == ["worker/insights", "worker/read_bandwidth.json"]
    assert (worker / "nightly_insights" / "insights" / "abc").is_dir()
    assert (worker / "generate" / "k1").is_dir()       # generate's folder was already its kind's name
    assert (worker / "probe" / "read_bandwidth.json").exists() and not (worker / "insights").exists()


def test_a_run_may_write_its_own_kinds_state_folder_only(tmp_path: Path):
    cfg = _cfg(tmp_path)
    fence = WorkerFence.for_config(cfg)
    run = SimpleNamespace(id=7, kind="probe", params={"path": str(tmp_path)}, needs_paging=False)
    spec = build_spec(cfg, registry(), run, sys.executable)
    assert Path(spec.state_dir) == cfg.worker_state_dir / "probe"
    assert fence.run_writable(spec) == (cfg.worker_state_dir.absolute() / "probe",)
    fence.prepare(Path(spec.state_dir))
    assert (cfg.worker_state_dir / "probe").is_dir() and not (cfg.worker_state_dir / "generate").exists()
