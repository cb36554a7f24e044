"""The slurm executor's pure parts: Slurm states as ours, exit codes, the sbatch command line and
batch script (no job param ever reaches them), and the events-file tailer."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.contract import protocol
from jobs.contract.spec import ModelSpec
from jobs.contract.typed import ByteSize
from jobs.paging.plan.profiles import profile
from lab_attendant.config import ExecutorConfig, SlurmConfig, parse_config
from lab_attendant.errors import UserError
from lab_attendant.executors.eventfile import FileTail, read_events
from lab_attendant.executors.slurm import (
    SlurmExecutor,
    batch_script,
    map_state,
    parse_exit_code,
    run_request,
    sbatch_argv,
    time_limit_min,
)
from lab_attendant.plan import host_request, plan_model
from lab_attendant.store.states import RunState
from lab_attendant.validate import check_executor
from tests.conftest import MODEL_GGUF
from tests.unit.fakes import FakeHost


@pytest.mark.parametrize("state, phase, end_state", [
    ("PENDING", "waiting", None), ("CONFIGURING", "waiting", None),
    ("RUNNING", "running", None), ("COMPLETING", "running", None),
    ("COMPLETED", "ended", None),          # the worker's exit code and result decide
    ("FAILED", "ended", None),             # the worker's error event says why
    ("CANCELLED", "ended", RunState.CANCELLED), ("CANCELLED by 0", "ended", RunState.CANCELLED),
    ("TIMEOUT", "ended", RunState.TIMED_OUT), ("OUT_OF_MEMORY", "ended", RunState.OOM),
    ("NODE_FAIL", "ended", RunState.LOST), ("BOOT_FAIL", "ended", RunState.LOST),
    ("PREEMPTED", "ended", RunState.LOST), ("WHATEVER_NEW", "ended", RunState.LOST),
])
def test_slurm_states_map_to_ours(state: str, phase: str, end_state: RunState | None):
    status = map_state(state, "None")
    assert (status.phase, status.end_state) == (phase, end_state)
    if end_state is not None:
        assert status.why


def test_a_memory_limit_kill_without_cgroups_is_oom():
    # Without cgroups slurmstepd kills the job ("exceeded memory limit") and it ends FAILED.
    assert map_state("FAILED", memory_killed=True).end_state is RunState.OOM
    assert "memory limit" in map_state("CANCELLED", memory_killed=True).why
    assert map_state("COMPLETED", memory_killed=True).end_state is None


def test_exit_codes_read_like_popen_return_codes():
    assert parse_exit_code("0:0") == 0
    assert parse_exit_code("1:0") == 1
    assert parse_exit_code("0:15") == -15              # ended by SIGTERM
    assert parse_exit_code("") is None and parse_exit_code("n/a") is None


def test_sbatch_argv_carries_config_and_paths_only(tmp_path: Path):
    cfg = SlurmConfig(partition="gpu", account="lab", gres="gpu:1", cpus=4,
                      mem_bytes=3 * 1024**3 + 1, extra_args=("--qos=night", "--nice=5"))
    script = tmp_path / "worker.sbatch"
    argv = sbatch_argv(cfg, job_name="la-1234abcd-7", run_dir=tmp_path, timeout_s=90,
                       script=script)
    assert argv[:2] == ["sbatch", "--parsable"] and argv[-1] == str(script)
    for opt in ("--partition=gpu", "--account=lab", "--gres=gpu:1", "--cpus-per-task=4",
                "--mem=3073M", "--time=3", f"--chdir={tmp_path}", "--job-name=la-1234abcd-7",
                f"--output={tmp_path / 'slurm-output.log'}"):
        assert opt in argv
    assert argv[-3:-1] == ["--qos=night", "--nice=5"]
    # No table: the cluster's defaults (no partition, account, gres, cpus or mem is asked for).
    bare = sbatch_argv(SlurmConfig(), job_name="j", run_dir=tmp_path, timeout_s=60, script=script)
    assert not [a for a in bare if a.split("=")[0] in
                ("--partition", "--account", "--gres", "--cpus-per-task", "--mem")]


@pytest.mark.skipif(not MODEL_GGUF.is_file(), reason="needs models/gemma-3-270m-q4_k_m.gguf "
                    "(scripts/test.sh: model import-default)")
def test_a_model_run_asks_for_its_planned_host_memory_and_a_gpu_unless_the_config_says(
        tmp_path: Path):
    spec = SimpleNamespace(run_id=3, params={"batch_size": 8},
                           model=ModelSpec(name="g", path=str(MODEL_GGUF), device="cpu"))
    req = run_request(SlurmConfig(), spec)
    expected, how = host_request(spec.model, 8)
    plan = plan_model(spec.model, profile("cpu"), batch=8)
    assert req.mem_bytes == expected >= plan.peak_device_bytes * 1.25 + 1024**3 > 2 * 1024**3
    assert req.mem_bytes % (256 * 1024**2) == 0 and req.gres == ""
    assert f"--mem={req.mem_bytes // 1024**2}M (the memory plan's host peak" in req.why
    argv = sbatch_argv(SlurmConfig(), job_name="j", run_dir=tmp_path, timeout_s=60,
                       script=tmp_path / "s", request=req)
    assert f"--mem={req.mem_bytes // 1024**2}M" in argv and not any("--gres" in a for a in argv)
    cuda = SimpleNamespace(run_id=4, params={}, model=dataclasses.replace(spec.model, device="cuda"))
    req = run_request(SlurmConfig(), cuda)
    assert req.gres == "gpu:1" and req.mem_bytes >= 1024**3 and "runs on cuda" in req.why
    # the config's own values win, and a model-less run asks for nothing
    mine = run_request(SlurmConfig(mem_bytes=ByteSize(1024**3), gres="gpu:a100:2"), cuda)
    assert (mine.mem_bytes, mine.gres, mine.why) == (0, "", "")
    argv = sbatch_argv(SlurmConfig(mem_bytes=ByteSize(1024**3), gres="gpu:a100:2"), job_name="j",
                       run_dir=tmp_path, timeout_s=60, script=tmp_path / "s", request=mine)
    assert "--mem=1024M" in argv and "--gres=gpu:a100:2" in argv
    assert run_request(SlurmConfig(), SimpleNamespace(run_id=5, params={}, model=None)).why == ""
    missing = dataclasses.replace(spec.model, path=str(tmp_path / "none.gguf"))
    req = run_request(SlurmConfig(), SimpleNamespace(run_id=6, params={}, model=missing))
    assert req.mem_bytes == 0 and "no --mem (the cluster's default)" in req.why


def test_time_limit_rounds_up_to_whole_minutes_with_grace():
    assert time_limit_min(1, 0) == 1
    assert time_limit_min(60, 0) == 1 and time_limit_min(61, 0) == 2
    assert time_limit_min(4, 60) == 2


def test_batch_script_quotes_paths_and_execs_the_worker(tmp_path: Path):
    spec = tmp_path / "run dir; rm -rf ~" / "spec.json"
    text = batch_script(7, "/opt/py thon/bin/python", spec)
    assert text.startswith("#!/bin/sh\n")
    last = text.strip().splitlines()[-1]
    assert shlex.split(last) == ["exec", "/opt/py thon/bin/python", "-m", "jobs.worker", str(spec)]


# -- the events-file tailer -------------------------------------------------------------------
def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_tailer_returns_complete_lines_and_keeps_a_partial_one_for_later(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    tail = FileTail(path)
    assert tail.read_lines() == []                    # the worker has not written yet
    _append(path, b'first\nsec')
    assert tail.read_lines() == [b"first"] and tail.offset == len(b"first\n")
    assert tail.read_lines() == []                    # still partial
    _append(path, b'ond\nthird\n')
    assert tail.read_lines() == [b"second", b"third"]
    _append(path, b"no newline at the end")
    assert tail.read_lines(final=True) == [b"no newline at the end"]
    assert tail.offset == path.stat().st_size


def test_tailer_resumes_from_a_saved_offset_and_rereads_a_truncated_file(tmp_path: Path):
    path = tmp_path / "out.log"
    _append(path, b"a\nb\n")
    assert FileTail(path, offset=2).read_lines() == [b"b"]
    tail = FileTail(path, offset=4)
    path.write_bytes(b"x\n")                           # shorter than the offset: truncated
    assert tail.read_lines() == [b"x"]


def test_events_from_the_file_as_the_worker_writes_them(tmp_path: Path, monkeypatch):
    path = tmp_path / "events.jsonl"
    monkeypatch.delenv(protocol.EVENT_FD_ENV, raising=False)
    monkeypatch.setenv(protocol.EVENT_FILE_ENV, str(path))
    writer = protocol.EventWriter()
    writer.emit(protocol.STARTED, pid=1)
    writer.emit(protocol.PROGRESS, done=1, total=2, unit="notes")
    _append(path, b"not an event\n" + protocol.encode(protocol.RESULT, path="/r.json")[:-5])
    tail = FileTail(path)
    events = read_events(tail)
    assert [type(e) for e in events] == [protocol.Started, protocol.Progress, protocol.Rejected]
    assert events[2].reason == "not a JSON line" and events[1].done == 1
    _append(path, protocol.encode(protocol.RESULT, path="/r.json")[-5:])
    assert [e.path for e in read_events(tail)] == ["/r.json"]
    assert all(json.loads(ln) for ln in path.read_bytes().splitlines()[:2])


# -- polling, with scripted squeue/scontrol answers --------------------------------------------
class SlurmHost(FakeHost):
    """FakeHost plus scripted Slurm CLI answers: `jobs` is what squeue/scontrol know."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, tuple[str, str]] = {}      # job id -> (JobState, ExitCode)
        self.calls: list[list[str]] = []

    def run(self, argv, *, timeout_s, env=None) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        if argv[0] == "squeue":
            ids = argv[-1].split("=")[1].split(",")
            out = "".join(f"{j}|{self.jobs[j][0]}|None\n" for j in ids if j in self.jobs)
            return subprocess.CompletedProcess(argv, 0 if out else 1, out, "")
        if argv[0] == "scontrol":
            j = argv[-1]
            if j not in self.jobs:
                return subprocess.CompletedProcess(argv, 1, "", "Invalid job id specified")
            state, code = self.jobs[j]
            return subprocess.CompletedProcess(argv, 0, f"JobId={j} JobState={state} "
                                               f"Reason=None ExitCode={code}\n", "")
        return subprocess.CompletedProcess(argv, 0, "", "")


def _watched(tmp_path: Path, job_id: str = "41"):
    host = SlurmHost()
    ex = SlurmExecutor(SlurmConfig(poll_interval_s=1.0, settle_s=5.0), host,
                       state_dir=tmp_path, kill_grace_s=2.0)
    # Followed as a re-attached run: the job a previous daemon submitted, offsets from 0.
    run = SimpleNamespace(id=1, needs_paging=False, executor_job_id=job_id, run_dir=str(tmp_path),
                          started_at=host.time(), timeout_s=1e9)
    w = ex.reattach(run, None)
    return host, ex, w


def test_one_squeue_call_per_interval_and_the_exit_code_from_scontrol(tmp_path: Path):
    host, ex, w = _watched(tmp_path)
    host.jobs["41"] = ("RUNNING", "0:0")
    assert ex.poll(w) is None and ex.poll(w) is None
    assert [c[0] for c in host.calls] == ["squeue"]    # the second poll used the cached listing
    host.jobs["41"] = ("FAILED", "1:0")
    host.advance(1.0)
    w.error = {"type": "ValueError", "message": "bad"}  # the worker's error event arrived
    assert ex.poll(w) == 1 and w.stop_state is None     # classify() words the failure


def test_an_ended_job_waits_for_its_last_events_then_settles(tmp_path: Path):
    host, ex, w = _watched(tmp_path)
    host.jobs["41"] = ("COMPLETED", "0:0")
    assert ex.poll(w) is None                           # no result event yet: maybe in flight
    host.advance(5.0)
    assert ex.poll(w) == 0                              # classify: exited 0 without a result


def test_slurm_decides_timeouts_and_a_job_it_forgot_is_lost(tmp_path: Path):
    host, ex, w = _watched(tmp_path)
    host.jobs["41"] = ("TIMEOUT", "0:15")
    w.error = {"type": "Terminated", "message": "received SIGTERM"}
    assert ex.poll(w) == -15 and w.stop_state is RunState.TIMED_OUT
    host, ex, w = _watched(tmp_path, job_id="42")       # purged after MinJobAge: nobody knows it
    assert ex.poll(w) is None
    host.advance(5.0)
    assert ex.poll(w) == protocol.EXIT_ERROR and w.stop_state is RunState.LOST
    assert "no longer knows job 42" in w.stop_reason and "exit code is unknown" in w.exit_how


def test_stop_cancels_once_and_escalates_to_sigkill_after_grace(tmp_path: Path):
    host, ex, w = _watched(tmp_path)
    ex.stop(w, RunState.CANCELLED, "cancelled by user")
    ex.stop(w, RunState.TIMED_OUT, "later reason loses")
    assert host.calls == [["scancel", "41"]] and w.stop_reason == "cancelled by user"
    assert not ex.escalate(w)
    host.advance(2.0)
    assert ex.escalate(w) and host.calls[-1] == ["scancel", "--full", "--signal=KILL", "41"]


def test_the_executor_is_chosen_by_submit_then_model_then_kind_then_default():
    ex = ExecutorConfig(default="local", kinds={"probe": "slurm"}, models={"big": "slurm",
                                                                            "small": "local"})
    assert ex.choose("probe", None) == "slurm"
    assert ex.choose("probe", "small") == "local"         # the model is more specific
    assert ex.choose("nightly_insights", "big") == "slurm"
    assert ex.choose("nightly_insights", None) == "local"
    assert ex.choose("probe", "big", "local") == "local"   # submit --executor wins


def test_a_slurm_submit_without_sbatch_says_what_to_do(tmp_path: Path, monkeypatch):
    cfg = parse_config({"worker": {"python": sys.executable}}, base_dir=tmp_path, source=None)
    monkeypatch.setenv("PATH", str(tmp_path))               # no sbatch on it
    check_executor("local", cfg)
    with pytest.raises(UserError, match="sbatch is not on PATH.*--executor local"):
        check_executor("slurm", cfg)


def test_time_waiting_in_slurms_queue_does_not_count_towards_the_timeout(tmp_path: Path):
    host, ex, w = _watched(tmp_path)
    w.deadline_mono = w.started_mono + 60.0
    host.jobs["41"] = ("PENDING", "0:0")
    for _ in range(3):
        host.advance(100.0)
        assert ex.poll(w) is None
    assert w.deadline_mono == host.monotonic() + 60.0
    host.jobs["41"] = ("RUNNING", "0:0")
    host.advance(30.0)
    ex.poll(w)
    assert w.deadline_mono == host.monotonic() + 30.0     # running: the clock runs
