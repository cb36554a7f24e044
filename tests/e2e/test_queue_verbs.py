"""The Slurm/pueue verbs of issue 32 on a real daemon: afterany/afternotok/singleton chains, `update`
of a queued run, bulk cancel/hold/release with --dry-run, pause/resume across a restart,
`parallel N`, `retry --force` and `submit --notify`."""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time

import pytest

from tests.conftest import EXPERIMENTAL_PYTHON, MODEL_GGUF, NEEDS_MODEL, Lab, wait_for, write_config

pytestmark = pytest.mark.e2e


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_afterany_and_afternotok_follow_a_failed_parent_and_an_ok_one_cancels_afternotok(lab: Lab):
    bad = lab.submit("crash")
    ok = lab.submit("sleepy", "seconds=0.1")
    anyway = lab.submit("sleepy", "seconds=0.1", extra=("--afterany", f"{bad},{ok}"))
    on_fail = lab.submit("sleepy", "seconds=0.1", extra=("--afternotok", str(bad)))
    never = lab.submit("sleepy", "seconds=0.1", extra=("--afternotok", str(ok)))
    listed = lab.cli("list").stdout
    assert f"waiting for run {bad} to end (queued)" in listed
    assert f"waiting for run {bad} to fail (queued)" in lab.show(on_fail)["waiting_for"]
    assert lab.show(anyway)["after_any"] == [bad, ok]
    lab.start_daemon()
    lab.cli("wait", str(bad), str(ok), str(anyway), str(on_fail), str(never), check=False,
            timeout=120)
    assert lab.state(anyway) == "succeeded" and lab.state(on_fail) == "succeeded"
    run = lab.show(never)
    assert run["state"] == "cancelled" and run["started_at"] is None
    assert f"run {ok} succeeded: afternotok can never be met" in run["reason"]
    assert lab.show(anyway)["started_at"] >= max(lab.show(bad)["ended_at"], lab.show(ok)["ended_at"])
    # the parent has decided now: a new afternotok on it is refused at submit, afterany is not
    refused = lab.cli("submit", "sleepy", "--afternotok", str(ok), check=False)
    assert refused.returncode == 2 and "would never start" in refused.stderr
    lab.cli("submit", "sleepy", "-p", "seconds=0.1", "--afterany", str(ok))


def test_singleton_runs_one_run_of_a_name_at_a_time(lab: Lab):
    assert lab.cli("submit", "sleepy", "--singleton", check=False).returncode == 2   # needs --name
    first = lab.submit("sleepy", "seconds=2", extra=("--name", "solo", "--singleton"))
    second = lab.submit("sleepy", "seconds=0.1", extra=("--name", "solo", "--singleton"))
    other = lab.submit("sleepy", "seconds=0.1", extra=("--name", "other", "--singleton"))
    lab.start_daemon()     # max_concurrent = 2: only the singleton keeps `second` waiting
    wait_for(lambda: f"singleton: run {first} named 'solo' is running"
             in (lab.show(second)["waiting_for"] or ""), what="second to wait for first")
    assert lab.cli("wait", str(first), str(second), str(other), timeout=120).returncode == 0
    a, b, c = lab.show(first), lab.show(second), lab.show(other)
    assert a["ended_at"] <= b["started_at"]
    assert c["started_at"] < a["ended_at"]    # another name does not wait


def test_update_changes_a_queued_run_checked_like_a_submit(lab: Lab):
    rid = lab.submit("sleepy", "seconds=300", extra=("--begin", "+1h", "--name", "later"))
    bad = lab.cli("update", str(rid), "-p", "seconds=abc", check=False)
    assert bad.returncode == 2 and "must be a number" in bad.stderr
    unknown = lab.cli("update", str(rid), "-p", "nosuch=1", check=False)
    assert unknown.returncode == 2 and "has no param 'nosuch'" in unknown.stderr
    assert lab.cli("update", str(rid), check=False).returncode == 2   # nothing to change
    assert lab.show(rid)["params"]["seconds"] == 300
    out = lab.cli("update", str(rid), "--priority", "7", "--timeout", "60", "-p", "seconds=0.1",
                  "--begin", "now").stdout
    assert f"run {rid} updated: priority 7" in out
    run = lab.show(rid)
    assert (run["priority"], run["timeout_s"], run["params"]["seconds"]) == (7, 60, 0.1)
    assert run["not_before"] <= time.time()
    assert any(e["kind"] == "update" and "priority 0 -> 7" in e["reason"] for e in run["events"])
    lab.start_daemon()
    assert lab.cli("wait", str(rid), timeout=60).returncode == 0     # 0.1 s, not 300 s, not 1 h
    ended = lab.cli("update", str(rid), "--priority", "1", check=False)
    assert ended.returncode == 2 and "only a waiting run" in ended.stderr


def test_bulk_cancel_hold_release_by_name_state_kind_with_dry_run(lab: Lab):
    batch = [lab.submit("sleepy", "seconds=60", extra=("--name", f"batch-{i}")) for i in range(3)]
    keep = lab.submit("sleepy", "seconds=60", extra=("--name", "keep"))
    crash = lab.submit("crash", extra=("--name", "batch-x"))
    dry = lab.cli("cancel", "--name", "batch-*", "--kind", "sleepy", "--dry-run").stdout
    assert [f"would cancel run {r} (sleepy 'batch-{i}', queued)" for i, r in enumerate(batch)] \
        == dry.splitlines()[:3] and "nothing changed" in dry
    assert {lab.state(r) for r in [*batch, keep, crash]} == {"queued"}
    held = lab.cli("hold", "--name", "batch-*", "--state", "queued").stdout
    assert held.splitlines() == [f"run {r} held" for r in [*batch, crash]]
    assert lab.cli("release", "--kind", "crash").stdout.strip() == f"run {crash} released"
    assert lab.cli("cancel", "--name", "nomatch-*").stdout.strip() == "no runs to cancel match"
    assert lab.cli("cancel", check=False).returncode == 2              # no ids, no selection
    out = lab.cli("cancel", "--name", "batch-?", "--state", "held").stdout
    assert out.splitlines() == [f"run {r} cancelled" for r in batch]
    assert lab.state(keep) == "queued" and lab.state(crash) == "queued"
    assert lab.cli("release", "--state", "held").stdout.strip() == "no runs to release match"


def test_pause_admits_nothing_across_a_restart_running_runs_go_on_then_resume(lab: Lab):
    daemon = lab.start_daemon()
    running = lab.submit("sleepy", "seconds=5")
    lab.wait_state(running, {"starting", "running"})
    assert "queue paused since" in lab.cli("pause").stdout
    paused_since = json.loads(lab.cli("status", "--json").stdout)["paused_since"]
    assert "already paused" in lab.cli("pause").stdout
    waiting = lab.submit("sleepy", "seconds=0.1")
    assert lab.cli("wait", str(running), timeout=60).returncode == 0   # the running one went on
    assert lab.show(running)["ended_at"] > paused_since
    _stop(daemon)
    daemon = lab.start_daemon()
    wait_for(lambda: "running (pid" in lab.cli("status").stdout, what="the new daemon")
    time.sleep(0.5)    # several ticks of a daemon polling every 0.1 s
    assert lab.state(waiting) == "queued"
    status = json.loads(lab.cli("status", "--json").stdout)
    assert status["paused_since"] is not None
    assert "PAUSED since" in lab.cli("status").stdout
    assert "queue resumed" in lab.cli("resume").stdout
    assert lab.cli("wait", str(waiting), timeout=60).returncode == 0
    assert json.loads(lab.cli("status", "--json").stdout)["paused_since"] is None


def test_parallel_changes_max_concurrent_while_the_daemon_runs(lab: Lab):
    lab.start_daemon()                       # max_concurrent = 2 in the config
    lab.cli("pause")                         # both runs wait, then are offered in one tick
    assert "up to 1 run at once (set by" in lab.cli("parallel", "1").stdout
    assert json.loads(lab.cli("status", "--json").stdout)["parallel"] == 1
    ids = [lab.submit("sleepy", "seconds=0.5") for _ in range(2)]
    lab.cli("resume")
    assert lab.cli("wait", *map(str, ids), timeout=60).returncode == 0
    a, b = map(lab.show, ids)
    assert a["ended_at"] <= b["started_at"]
    assert lab.cli("parallel", "0", check=False).returncode == 2
    lab.cli("pause")
    assert "config's max_concurrent" in lab.cli("parallel", "--reset").stdout
    ids = [lab.submit("sleepy", "seconds=1") for _ in range(2)]
    lab.cli("resume")
    assert lab.cli("wait", *map(str, ids), timeout=60).returncode == 0
    a, b = map(lab.show, ids)
    assert b["started_at"] < a["ended_at"]   # two at once again


def test_retry_force_reruns_a_succeeded_run(lab: Lab):
    rid = lab.submit("sleepy", "seconds=0.1")
    lab.cli("daemon", "--burst", timeout=60)
    refused = lab.cli("retry", str(rid), check=False)
    assert refused.returncode == 2 and f"retry --force {rid}" in refused.stderr
    again = json.loads(lab.cli("retry", "--force", str(rid), "--json").stdout)
    assert again["retry_of"] == rid and again["state"] == "queued"
    lab.cli("daemon", "--burst", timeout=60)
    assert lab.state(again["id"]) == "succeeded"


DUMP = """import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps([os.environ["LAB_ATTENDANT_RUN_ID"], os.environ["LAB_ATTENDANT_RUN_STATE"]]) + "\\n")
"""


def test_submit_notify_end_fail_all_add_to_the_configured_ends(lab: Lab):
    refused = lab.cli("submit", "sleepy", "--notify", "end", check=False)
    assert refused.returncode == 2 and "[notify] command or url" in refused.stderr
    script, dump = lab.root / "dump.py", lab.root / "notified.jsonl"
    script.write_text(DUMP)
    lab.config = write_config(lab.root, extra=f'\n[notify]\non = ["oom"]\n'
                              f'command = ["{sys.executable}", "{script}", "{dump}"]\n')
    end = lab.submit("sleepy", "seconds=0.1", extra=("--notify", "end"))
    lab.submit("sleepy", "seconds=0.1", extra=("--notify", "fail"))   # succeeds: no notification
    fail_bad = lab.submit("crash", extra=("--notify", "fail"))
    every = lab.submit("sleepy", "seconds=0.1", extra=("--notify", "all"))
    lab.submit("crash")                       # failed is not in [notify] on, no --notify
    lab.cli("daemon", "--burst", timeout=60)  # waits for notifications in flight at exit
    got = sorted(tuple(json.loads(line)) for line in dump.read_text().splitlines())
    assert got == sorted([(str(end), "succeeded"), (str(fail_bad), "failed"),
                          (str(every), "started"), (str(every), "succeeded")])


@NEEDS_MODEL
@pytest.mark.skipif(shutil.which("sbatch") is None,
                    reason="Slurm's sbatch is not on PATH (scripts/test.sh installs slurm-client on CI)")
def test_update_executor_moves_a_waiting_run_and_a_model_routed_elsewhere_is_named(model_lab: Lab):
    lab = model_lab
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, default_timeout_s=900,
                 extra=f'[models.big]\npath = "{MODEL_GGUF}"\n[executor]\nmodels = {{ big = "slurm" }}\n')
    prompts = lab.root / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Lisbon is the capital of"}) + "\n")
    rid = lab.submit("generate", f"prompts={prompts}")
    assert lab.show(rid)["executor"] == "local"
    out = lab.cli("update", str(rid), "-p", "model=big").stdout
    # The row does not say whether submit's --executor chose "local": the run stays, the line says how to move
    assert f"note: [executor] sends model 'big' to slurm; run {rid} stays on local" in out
    assert f"`lab-attendant update {rid} --executor slurm`" in out
    assert lab.show(rid)["executor"] == "local" and lab.show(rid)["params"]["model"] == "big"
    assert f"run {rid} updated: executor slurm" in lab.cli("update", str(rid), "--executor", "slurm").stdout
    run = lab.show(rid)
    assert run["executor"] == "slurm"
    assert any(e["kind"] == "update" and "local -> slurm" in e["reason"] for e in run["events"])
    assert "note:" not in lab.cli("update", str(rid), "-p", "max_new_tokens=8").stdout   # same model
