"""Runs through a real single-node Slurm (slurmctld + slurmd + munged, scripts/slurm.sh): the
slurm executor's whole life of a run — success with events from the file, cancel, timeout,
failure, and a daemon restart that re-attaches instead of losing the run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import (
    EXPERIMENTAL_PYTHON,
    MODEL_GGUF,
    NEEDS_MODEL,
    RESIDENT_DEFAULT,
    ROOT,
    Lab,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.e2e
ENDED = {"succeeded", "failed", "cancelled", "timed_out", "oom", "lost", "killed_thermal"}
SLURM = ("--executor", "slurm")
SLURM_TOML = """
[executor.slurm]
poll_interval_s = 0.3
settle_s = 3.0
"""


@pytest.fixture(scope="module")
def slurm_conf():
    """A cluster for this module; skipped with the reason when it cannot start, unless
    scripts/test.sh installed Slurm and set LAB_ATTENDANT_REQUIRE_SLURM (CI): then it fails."""
    required = bool(os.environ.get("LAB_ATTENDANT_REQUIRE_SLURM"))
    if not shutil.which("slurmctld") and os.geteuid() != 0 and not required:
        pytest.skip("Slurm is not installed and installing it needs root (scripts/slurm.sh)")
    cluster = Path(tempfile.mkdtemp(prefix="lab-slurm-"))
    script = ROOT / "scripts" / "slurm.sh"
    up = subprocess.run(["bash", str(script), "up", str(cluster)], capture_output=True, text=True,
                        timeout=600)
    if up.returncode != 0:
        subprocess.run(["bash", str(script), "down", str(cluster)], timeout=60)
        (pytest.fail if required else pytest.skip)(
            f"no single-node Slurm cluster: {up.stderr.strip()[-800:]}")
    conf = cluster / "slurm.conf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))     # the CLI, the daemon and its sbatch calls
        yield conf
    subprocess.run(["bash", str(script), "down", str(cluster)], timeout=60)
    shutil.rmtree(cluster, ignore_errors=True)


@pytest.fixture
def slurm_lab(lab: Lab, slurm_conf: Path):
    write_config(lab.root, extra=SLURM_TOML, max_concurrent=4)
    yield lab
    subprocess.run(["scancel", f"--user={os.getuid()}"], timeout=30)   # nothing outlives a test


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def transitions(run: dict) -> list[tuple[str | None, str]]:
    return [(e["from"], e["to"]) for e in run["events"] if e["kind"] == "transition"]


@pytest.mark.slow
@NEEDS_MODEL
def test_probe_and_nightly_insights_succeed_through_slurm(slurm_lab: Lab):
    lab = slurm_lab
    # the default model held resident (its bf16 folder): this is the Slurm path, not streaming
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, extra=SLURM_TOML + RESIDENT_DEFAULT, default_timeout_s=600)
    (lab.root / "models").symlink_to(ROOT / "models")
    archive = lab.root / "archive"
    archive.mkdir()
    for name in ("2009-03-14-first-bike-tour.md", "2014-06-14-the-database-outage.md"):
        shutil.copy2(ROOT / "examples" / "archive" / name, archive / name)
    blob = lab.root / "blob.bin"
    blob.write_bytes(os.urandom(1024**2))
    lab.start_daemon("--experimental-paging")
    probe = lab.submit("probe", f"path={blob}", extra=SLURM)
    notes = lab.submit("nightly_insights", f"archive={archive}", "max_notes=1",
                       "max_new_tokens=4", extra=SLURM)
    for rid in (probe, notes):
        run = lab.wait_state(rid, ENDED, timeout_s=400)
        assert run["state"] == "succeeded", (run["reason"], lab.cli("logs", str(rid)).stdout)
        assert run["executor"] == "slurm" and run["pid"] is None
        assert job(run["executor_job_id"])["JobState"] == "COMPLETED"
        assert transitions(run)[-2:] == [("starting", "running"), ("running", "succeeded")]
        events_file = Path(run["run_dir"]) / "events.jsonl"
        kinds = [json.loads(line)["event"] for line in events_file.read_text().splitlines()]
        assert kinds[0] == "started" and "result" in kinds
        running = next(e for e in run["events"] if e["to"] == "running")
        assert f"Slurm job {run['executor_job_id']} started" in running["reason"]
    # the cluster's DefMemPerCPU=1024 would kill it: the model run asked for its plan instead
    asked = [e["reason"] for e in lab.show(notes)["events"] if e["kind"] == "requested"]
    assert len(asked) == 1 and asked[0].startswith("--mem="), asked
    assert not [e for e in lab.show(probe)["events"] if e["kind"] == "requested"]
    report = json.loads(Path(lab.show(notes)["result_path"]).read_text())
    assert report["notes_processed"] == 1 and report["notes_left_for_next_run"] == 1
    run = lab.show(notes)
    assert run["progress"]["total"] == 1 and run["progress"]["done"] == 1   # progress from the file
    assert run["metrics"]["tokens_generated"] > 0
    assert json.loads(Path(lab.show(probe)["result_path"]).read_text())[
        "read_bandwidth"]["bytes_read"] == 1024**2
    assert "probe done" in lab.cli("logs", str(probe)).stdout   # sbatch --output, tailed


def test_cancel_timeout_and_failure_through_slurm(slurm_lab: Lab):
    lab = slurm_lab
    lab.start_daemon()
    cancel = lab.submit("sleepy", "seconds=60", extra=SLURM)
    slow = lab.submit("sleepy", "seconds=60", extra=(*SLURM, "--timeout", "4"))
    crash = lab.submit("crash", extra=SLURM)
    run = lab.wait_state(cancel, {"running"}, timeout_s=60)
    assert "daemon will stop it" in lab.cli("cancel", str(cancel)).stdout
    run = lab.wait_state(cancel, ENDED, timeout_s=60)
    assert run["state"] == "cancelled" and "cancelled by user" in run["reason"]
    assert job(run["executor_job_id"])["JobState"] == "CANCELLED"      # by scancel

    run = lab.wait_state(crash, ENDED, timeout_s=90)
    assert run["state"] == "failed" and run["exit_code"] == 1
    assert "ValueError: fixture crash" in run["reason"]
    assert job(run["executor_job_id"])["JobState"] == "FAILED"
    assert "Traceback" in lab.cli("logs", str(crash)).stdout

    run = lab.wait_state(slow, ENDED, timeout_s=90)
    assert run["state"] == "timed_out" and "timed out after 4 s" in run["reason"]
    assert job(run["executor_job_id"])["JobState"] == "CANCELLED"
    assert job(run["executor_job_id"])["TimeLimit"] == "00:02:00"   # 4 s + 60 s grace, in min


def test_daemon_restarts_reattach_to_a_slurm_run(slurm_lab: Lab):
    lab = slurm_lab
    daemon = lab.start_daemon()
    rid = lab.submit("sleepy", "seconds=8", extra=SLURM)
    run = lab.wait_state(rid, {"running"}, timeout_s=60)
    job_id = run["executor_job_id"]
    # Warm stop: the daemon detaches (it does not wait for, requeue or cancel the Slurm job).
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    assert job(job_id)["JobState"] == "RUNNING" and lab.state(rid) == "running"
    # A crash: nothing is detached in order; the next start re-attaches by job id.
    daemon = lab.start_daemon()
    wait_for(lambda: "re-attached run" in lab.daemon_output(), 30, "re-attach")
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    lab.start_daemon()
    run = lab.wait_state(rid, ENDED, timeout_s=60)
    assert run["state"] == "succeeded", run["reason"]
    assert run["executor_job_id"] == job_id
    assert transitions(run) == [(None, "queued"), ("queued", "starting"),
                                ("starting", "running"), ("running", "succeeded")]
    assert [e["kind"] for e in run["events"]].count("result") == 1
    assert run["progress"]["done"] and run["progress"]["total"] == 80


def test_a_request_the_cluster_cannot_satisfy_fails_at_sbatch_with_its_message(slurm_lab: Lab):
    lab = slurm_lab                     # the test node has no GPU: Slurm refuses, it never pends
    write_config(lab.root, extra=SLURM_TOML + 'gres = "gpu:1"\n')
    lab.start_daemon()
    run = lab.wait_state(lab.submit("sleepy", "seconds=1", extra=SLURM), ENDED, timeout_s=60)
    assert run["state"] == "failed" and run["executor_job_id"] is None
    assert "sbatch refused the job" in run["reason"] and "gres" in run["reason"].lower()


@pytest.mark.skipif(not MODEL_GGUF.is_file(), reason="needs models/gemma-3-270m-q4_k_m.gguf "
                    "(scripts/test.sh: model import-default)")
def test_a_model_run_asks_slurm_for_its_planned_memory_past_defmempercpu(slurm_lab: Lab):
    """The cluster gives a job that asks for nothing DefMemPerCPU=1024 (scripts/slurm.sh): a
    model-less run holding 1.5 GiB is killed for it, the same run with a model asks for the
    plan's host peak and succeeds, and `show` says what was asked."""
    lab = slurm_lab
    (lab.root / "models").symlink_to(ROOT / "models")
    lab.start_daemon()
    hog = ("target_rss_bytes=1536MiB", "pause_s=0.002", "hold_s=4")
    bare = lab.submit("hog", *hog, extra=SLURM)
    planned = lab.submit("model_hog", *hog, extra=SLURM)
    run = lab.wait_state(bare, ENDED, timeout_s=120)
    assert run["state"] == "oom" and "memory limit" in run["reason"], run["reason"]
    assert not [e for e in run["events"] if e["kind"] == "requested"]
    run = lab.wait_state(planned, ENDED, timeout_s=120)
    assert run["state"] == "succeeded", (run["reason"], lab.cli("logs", str(planned)).stdout)
    asked = int(job(run["executor_job_id"])["MinMemoryNode"].removesuffix("M"))
    assert asked * 1024**2 > 1536 * 1024**2 + 1024**3          # plan + margin + the worker
    requested = [e["reason"] for e in run["events"] if e["kind"] == "requested"]
    assert len(requested) == 1 and re.fullmatch(
        rf"--mem={asked}M \(the memory plan's host peak [\d.]+ [MG]iB \+ 25% \+ 1\.0 GiB for the "
        r"worker itself\)", requested[0]), requested
    shown = lab.cli("show", str(planned)).stdout
    assert f"requested  --mem={asked}M" in shown


def test_an_events_file_swapped_for_a_fifo_or_a_dev_zero_link_is_refused(slurm_lab: Lab):
    """Issue #31, item 3: a FIFO used to block the daemon forever, a /dev/zero link to exhaust its
    memory. Each is refused with a recorded reason, both runs end, the daemon keeps serving."""
    lab = slurm_lab
    daemon = lab.start_daemon()
    fifo = lab.submit("swap_events", "to=fifo", extra=SLURM)
    zero = lab.submit("swap_events", "to=zero", extra=SLURM)
    runs = {rid: lab.wait_state(rid, ENDED, timeout_s=90) for rid in (fifo, zero)}
    for rid, what in ((fifo, "is a FIFO, not read"), (zero, "is a symbolic link, not read")):
        warnings = [e["reason"] for e in runs[rid]["events"] if e["kind"] == "warning"]
        assert any(what in w for w in warnings), (rid, warnings)
    assert daemon.poll() is None
    after = lab.submit("sleepy", "seconds=0.5", "quiet=true", extra=SLURM)
    assert lab.wait_state(after, ENDED, timeout_s=60)["state"] == "succeeded"


def test_a_slurm_worker_cannot_write_the_store_or_another_runs_events(slurm_lab: Lab):
    """Issue #31, item 2 on a Slurm node: the batch script starts the worker behind the same
    Landlock launcher (where the node's kernel has it)."""
    from jobs.contract.sandbox import landlock_abi
    if not landlock_abi()[0]:
        pytest.skip(f"no Landlock here: {landlock_abi()[1]}")
    lab = slurm_lab
    lab.start_daemon()
    other = lab.submit("sleepy", "seconds=0.2", "quiet=true", extra=SLURM)
    lab.wait_state(other, {"succeeded"}, timeout_s=60)
    other_dir = lab.state_dir / "runs" / str(other)
    rid = lab.submit("tamper", f"other_run_dir={other_dir}", extra=SLURM)
    run = lab.wait_state(rid, ENDED, timeout_s=60)
    assert run["state"] == "succeeded", run["reason"]
    out = json.loads((lab.state_dir / "runs" / str(rid) / "output" / "result.json").read_text())
    assert out["store"].startswith("refused") and out["other_run"].startswith("refused"), out
    assert out["own_run"] == "written" and out["worker_state"] == "written", out
    assert "jobs.contract.sandbox" in (lab.state_dir / "runs" / str(rid) / "worker.sbatch").read_text()
