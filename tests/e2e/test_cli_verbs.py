"""The Slurm/pueue verbs on a real daemon: afterok chains, a failed parent cancelling its child,
hold/release, wait's exit codes, prune (exactly the selected rows and folders, never a running
run) and stats over a seeded history."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab_attendant.store.db import Store
from lab_attendant.store.states import RunState
from tests.conftest import Lab, wait_for

pytestmark = pytest.mark.e2e


def _ids(lab: Lab, *args: str) -> list[int]:
    return [r["id"] for r in json.loads(lab.cli("list", "--json", *args).stdout)]


def test_an_afterok_chain_of_three_runs_in_order_and_wait_exits_0(lab: Lab):
    a = lab.submit("sleepy", "seconds=0.5", extra=("--name", "chain-a"))
    b = lab.submit("sleepy", "seconds=0.5", extra=("--after", str(a), "--name", "chain-b"))
    c = lab.submit("sleepy", "seconds=0.5", extra=("--after", f"{a},{b}", "-J", "chain-c"))
    refused = lab.cli("submit", "sleepy", "--after", "999", check=False)
    assert refused.returncode == 2 and "there is no run 999" in refused.stderr
    listed = lab.cli("list").stdout
    assert "after run 1 (queued)" in listed and "chain-c" in listed
    assert _ids(lab, "--name", "chain-*") == [c, b, a]
    lab.start_daemon()
    done = lab.cli("wait", str(a), str(b), str(c), "--json", timeout=120)
    out = json.loads(done.stdout)
    assert done.returncode == 0 and out["exit_code"] == 0
    runs = {r["id"]: r for r in out["runs"]}
    assert all(r["state"] == "succeeded" for r in runs.values())
    assert runs[a]["ended_at"] <= runs[b]["started_at"]
    assert runs[b]["ended_at"] <= runs[c]["started_at"]
    assert runs[c]["after"] == [a, b]


def test_a_failed_parent_cancels_its_child_and_wait_exits_1(lab: Lab):
    parent = lab.submit("crash")
    child = lab.submit("sleepy", "seconds=0.2", extra=("--after", str(parent)))
    lab.start_daemon()
    proc = lab.cli("wait", str(parent), str(child), check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr
    run = lab.show(child)
    assert run["state"] == "cancelled" and run["started_at"] is None
    assert f"run {parent} (failed)" in run["reason"] and "fixture crash" in run["reason"]
    assert f"run {child} cancelled: dependency failed" in proc.stdout


def test_hold_keeps_a_run_waiting_until_release(lab: Lab):
    held = lab.submit("sleepy", "seconds=0.2")
    assert lab.cli("hold", str(held)).stdout.strip() == f"run {held} held"
    bad = lab.cli("hold", str(held), "999", check=False)
    assert bad.returncode == 2 and "no run 999" in bad.stderr
    lab.start_daemon()
    # This daemon runs without the flag: submit says it will hold a paging run.
    wait_for(lambda: "without --experimental-paging" in lab.cli("submit", "paging_echo").stderr,
             what="submit to warn that the daemon will hold a paging run")
    later = lab.submit("sleepy", "seconds=0.2")
    assert lab.cli("wait", str(later), timeout=120).returncode == 0   # the daemon is working
    run = lab.show(held)
    assert run["state"] == "held" and "release" in run["reason"]
    assert "held by user" in lab.cli("list", "--state", "held").stdout
    lab.cli("release", str(held))
    assert lab.cli("wait", str(held), timeout=120).returncode == 0


def test_wait_says_when_no_daemon_runs_and_times_out_with_code_3(lab: Lab):
    rid = lab.submit("sleepy", "seconds=300")
    gone = lab.cli("wait", str(rid), "--no-daemon", "exit", check=False, timeout=60)
    assert gone.returncode == 4 and "no daemon is running" in gone.stderr
    submitted = lab.cli("submit", "sleepy", "-p", "seconds=0.1", "--wait", "--no-daemon", "exit",
                        check=False)
    assert submitted.returncode == 4 and "no daemon is running" in submitted.stderr
    lab.start_daemon()
    lab.wait_state(rid, {"running"})
    assert wait_for(lambda: "ticks" in (out := lab.cli("status").stdout) and out,
                    what="status to show the running run's progress")
    late = lab.cli("wait", str(rid), "--timeout", "0.5", "--json", check=False, timeout=60)
    assert late.returncode == 3 and json.loads(late.stdout)["runs"][0]["state"] == "running"
    follow, waiter = (subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                                        str(lab.config), *argv, str(rid)], stderr=subprocess.PIPE,
                                       text=True, env=lab.env(), cwd=lab.root)
                      for argv in (["logs", "-f"], ["wait"]))
    assert "ticks" in follow.stderr.readline()                      # logs -f: progress lines
    assert f"run {rid} running" in waiter.stderr.readline()        # wait is in its loop
    waiter.send_signal(signal.SIGINT)
    assert waiter.wait(60) == 130
    assert f"Re-attach with: lab-attendant wait {rid}" in waiter.stderr.read()
    assert lab.state(rid) == "running"                              # Ctrl-C stops the waiting only
    lab.cli("cancel", str(rid))
    assert lab.cli("wait", str(rid), check=False, timeout=60).returncode == 1
    assert follow.wait(60) == 0 and f"run {rid} cancelled" in follow.stderr.read()


def test_schedules_run_fires_one_now(lab: Lab):
    with open(lab.config, "a") as fh:
        fh.write('\n[[schedules]]\nid = "nightly"\ncron = "30 2 * * *"\nkind = "sleepy"\n'
                 'params = { seconds = 0.1 }\n')
    out = json.loads(lab.cli("schedules", "run", "nightly", "--json").stdout)
    assert out["schedule_id"] == "nightly" and out["state"] == "queued"
    assert "by hand" in out["reason"] and out["params"]["seconds"] == 0.1
    again = lab.cli("schedules", "run", "nightly", check=False)     # one open run per schedule
    assert again.returncode == 1 and f"previous run {out['id']}" in again.stdout
    unknown = lab.cli("schedules", "run", "weekly", check=False)
    assert unknown.returncode == 2 and "no schedule 'weekly'; schedules: nightly" in unknown.stderr
    assert _ids(lab, "--schedule", "nightly") == [out["id"] + 1, out["id"]]   # newest first


DAY_S = 86400.0


def _seed(lab: Lab) -> tuple[Store, dict[str, int]]:
    """A history written straight into the store the CLI reads: (kind, state, age in days,
    duration s, tokens/s)."""
    lab.cli("status")                       # creates the store
    store = Store(lab.state_dir / "lab_attendant.sqlite3")
    now = time.time()
    rows = {"old_ok": ("sleepy", RunState.SUCCEEDED, 40, 10.0, 4.0),
            "old_failed": ("crash", RunState.FAILED, 40, 1.0, None),
            "old_cancelled": ("sleepy", RunState.CANCELLED, 35, None, None),
            "mid_ok": ("sleepy", RunState.SUCCEEDED, 3, 20.0, 5.0),
            "new_ok": ("sleepy", RunState.SUCCEEDED, 1, 30.0, 6.0),
            "new_oom": ("sleepy", RunState.OOM, 1, 2.0, None)}
    ids = {}
    for key, (kind, state, age_days, dur_s, tps) in rows.items():
        run = store.submit(kind=kind, params={}, priority=0, timeout_s=60, needs_paging=False)
        ids[key] = run.id
        if state is RunState.CANCELLED:
            store.transition(run.id, state, "cancelled by user before it started")
        else:
            store.transition(run.id, RunState.STARTING, "claimed")
            store.transition(run.id, state, f"seeded {state}")
        ended = now - age_days * DAY_S
        store.update_run(run.id, submitted_at=ended - (dur_s or 0) - 5, ended_at=ended,
                         started_at=ended - dur_s if dur_s else None,
                         running_at=ended - dur_s if dur_s else None,
                         metrics_json=json.dumps({"tokens_per_s": tps} if tps else {}),
                         run_dir=str(lab.state_dir / "runs" / str(run.id)))
        out = lab.state_dir / "runs" / str(run.id) / "output"
        out.mkdir(parents=True)
        (out / "result.json").write_text("{}")
        (out / "report.md").write_text("# report\n")
        (lab.logs_dir / "runs").mkdir(parents=True, exist_ok=True)
        (lab.logs_dir / "runs" / f"{run.id}.log").write_text("line\n")
    return store, ids


def test_stats_over_a_seeded_history(lab: Lab):
    _store, ids = _seed(lab)
    week = json.loads(lab.cli("stats", "--since", "7d", "--json").stdout)
    sleepy = week["kinds"]["sleepy"]
    assert set(week["kinds"]) == {"sleepy"} and sleepy["runs"] == 3
    assert sleepy["by_state"] == {"oom": 1, "succeeded": 2}
    assert sleepy["success_rate"] == pytest.approx(2 / 3)
    assert sleepy["mean_duration_s"] == pytest.approx(25.0)
    assert sleepy["p95_duration_s"] == pytest.approx(30.0)
    assert [d["tokens_per_s"] for d in sleepy["tokens_per_s_by_day"]] == [5.0, 6.0]
    every = json.loads(lab.cli("stats", "--json").stdout)
    assert every["total"]["runs"] == 6 and every["kinds"]["crash"]["success_rate"] == 0
    assert every["kinds"]["sleepy"]["success_rate"] == pytest.approx(3 / 4)  # cancelled: no verdict
    table = lab.cli("stats", "--since", "7d", "--kind", "sleepy").stdout
    assert "67%" in table and "25 s" in table and "5.00 → 6.00 (+20%) over 2 days" in table
    assert _ids(lab, "--kind", "crash") == [ids["old_failed"]]
    assert _ids(lab, "--since", "7d", "--state", "succeeded,oom") == [ids["new_oom"], ids["new_ok"],
                                                                     ids["mid_ok"]]
    shown = lab.cli("show", str(ids["new_ok"])).stdout
    assert shown.index("report.md") < shown.index("result.json")   # the human file first
    assert "6.00 tokens/s" in shown and "ran for" in shown and "{" not in shown


def test_prune_removes_exactly_the_selected_runs_and_never_a_running_one(lab: Lab):
    store, ids = _seed(lab)
    lab.start_daemon()
    running = lab.submit("sleepy", "seconds=60")
    lab.wait_state(running, {"running"})
    refused = lab.cli("prune", str(running), check=False)
    assert refused.returncode == 2 and "only ended runs are pruned" in refused.stderr
    dry = json.loads(lab.cli("prune", "--older-than", "30d", "--keep-failed", "--dry-run",
                             "--json").stdout)
    assert dry["runs"] == [ids["old_ok"], ids["old_cancelled"]]
    assert store.get(ids["old_ok"]) is not None                      # a dry run deletes nothing
    out = json.loads(lab.cli("prune", "--older-than", "30d", "--keep-failed", "--json").stdout)
    assert out["runs"] == dry["runs"]
    gone, kept = set(dry["runs"]), set(ids.values()) - set(dry["runs"]) | {running}
    remaining = set(_ids(lab, "--limit", "0"))
    assert remaining == kept
    for rid in gone:
        assert not (lab.state_dir / "runs" / str(rid)).exists()
        assert not (lab.logs_dir / "runs" / f"{rid}.log").exists()
        assert store.events(rid) == []
    for rid in kept - {running}:
        assert (lab.state_dir / "runs" / str(rid) / "output" / "report.md").exists()
        assert (lab.logs_dir / "runs" / f"{rid}.log").exists()
    everything = json.loads(lab.cli("prune", "--older-than", "0s", "--json").stdout)
    assert running not in everything["runs"] and lab.state(running) == "running"
    assert set(_ids(lab, "--limit", "0")) == {running}
    assert (Path(lab.show(running)["run_dir"]) / "output").is_dir()
    lab.cli("cancel", str(running))
    wait_for(lambda: lab.state(running) == "cancelled", what="the cancel")
