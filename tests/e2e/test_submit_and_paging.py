"""Submission under contention, input errors, the paging flag and log isolation (FEAT-031)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Lab, write_config

pytestmark = pytest.mark.e2e


def _rows(lab: Lab) -> int:
    db = lab.state_dir / "lab_attendant.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def test_hundred_concurrent_submits_all_land(lab: Lab):
    lab.cli("status")  # create the store first, as any install would have
    procs = [subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                               str(lab.config), "submit", "sleepy", "-p", f"seconds={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=lab.env(), cwd=lab.root) for i in range(100)]
    results = [(p.wait(600), *p.communicate()) for p in procs]
    errors = [err for code, _out, err in results if code != 0 or "locked" in err]
    assert not errors, errors[:3]
    ids = sorted(int(out) for _code, out, _err in results)
    assert ids == list(range(1, 101))
    assert _rows(lab) == 100


def test_new_store_created_by_many_processes_at_once(lab: Lab):
    procs = [subprocess.Popen([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                               str(lab.config), "submit", "sleepy"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=lab.env(), cwd=lab.root)
             for _ in range(20)]
    assert all(p.wait(300) == 0 for p in procs), [p.communicate()[1] for p in procs]
    assert _rows(lab) == 20


@pytest.mark.parametrize("args, message", [
    (["submit", "no_such_kind"], "unknown kind 'no_such_kind'"),
    (["submit", "sleepy", "-p", "seconds"], "malformed -p 'seconds'"),
    (["submit", "sleepy", "-p", "seconds=soon"], "param 'seconds' must be a number"),
    (["submit", "sleepy", "-p", "naps=3"], "kind 'sleepy' has no param 'naps'"),
    (["submit", "probe", "-p", "path=/definitely/missing/file"], "does not exist"),
    (["submit", "probe", "-p", "path=/etc/hostname"], "outside the allowed roots"),
    (["submit", "sleepy", "--params-file", "/no/such/params.json"], "does not exist"),
    (["submit", "sleepy", "--timeout", "-3"], "--timeout must be a positive"),
])
def test_bad_input_exits_2_with_a_message_and_enqueues_nothing(lab: Lab, args, message):
    proc = lab.cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert _rows(lab) == 0


def test_a_quantized_variant_that_was_never_written_is_refused_at_submit(lab: Lab):
    write_config(lab.root, extra='[models.bare]\nvariant = "auto"\n')
    (lab.root / "models" / "bare").mkdir(parents=True)
    (lab.root / "models" / "bare" / "config.json").write_text("{}")
    (lab.root / "archive").mkdir()
    proc = lab.cli("submit", "nightly_insights", "-p", f"archive={lab.root / 'archive'}", "-p", "model=bare",
                   check=False)
    assert proc.returncode == 2 and _rows(lab) == 0
    assert "model 'bare' asks for variant 'auto'" in proc.stderr
    assert "lab-attendant model quantize bare --bits 4" in proc.stderr


def test_bad_config_names_the_key(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[limits]\nmax_concurent = 2\n")
    proc = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config", str(cfg),
                           "status"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "limits.max_concurent" in proc.stderr


def test_paging_kind_is_held_without_the_flag_and_runs_with_it(lab: Lab):
    rid = lab.submit("paging_echo", "lines=4")
    plain = subprocess.run([sys.executable, "-m", "lab_attendant.cli.main", "--config",
                            str(lab.config), "daemon", "--burst"], env=lab.env(),
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0
    run = lab.show(rid)
    assert run["state"] == "held" and "experimental paging is off" in run["reason"]
    # The flag is not persisted: another plain daemon still holds it.
    lab.cli("daemon", "--burst", timeout=60)
    assert lab.state(rid) == "held"
    lab.cli("daemon", "--burst", "--experimental-paging", timeout=60)
    run = lab.show(rid)
    assert run["state"] == "succeeded", run["reason"]
    assert [e["to"] for e in run["events"] if e["kind"] == "transition"] == [
        "queued", "held", "queued", "starting", "running", "succeeded"]


def test_main_log_holds_only_the_start_and_end_of_a_paging_run(lab: Lab):
    plain = lab.submit("sleepy", "seconds=0.2")
    paged = lab.submit("paging_echo", "lines=3")
    lab.cli("daemon", "--burst", "--experimental-paging", timeout=60)
    assert lab.state(plain) == "succeeded" and lab.state(paged) == "succeeded"
    main_lines = [json.loads(l) for l in (lab.logs_dir / "lab_attendant.log").read_text().splitlines()]
    paging_text = (lab.logs_dir / "experimental_paging.log").read_text()
    paging_lines = [json.loads(l) for l in paging_text.splitlines()]
    assert any(l.get("run_id") == plain for l in main_lines)      # ordinary runs are logged
    # Of a paging run, the main log (the journal) holds its outcome only: one start, one end.
    assert [l["event"] for l in main_lines if l.get("run_id") == paged] == ["run started",
                                                                            "run ended"]
    assert "paging-echo" not in (lab.logs_dir / "lab_attendant.log").read_text()
    assert not (lab.logs_dir / "runs" / f"{paged}.log").exists()
    assert sum(1 for l in paging_lines if l.get("run_id") == paged
               and "paging-echo line" in l.get("line", "")) == 3
    assert any(l.get("run_id") == paged and l.get("event") == "run ended" for l in paging_lines)
    shown = lab.cli("logs", str(paged)).stdout
    assert "paging-echo line 2 of run" in shown
    assert lab.show(paged)["log_path"].endswith("experimental_paging.log")


def test_submit_wait_follows_to_the_end(lab: Lab):
    lab.start_daemon()
    proc = lab.cli("submit", "sleepy", "-p", "seconds=1", "--wait", "--json", timeout=60)
    final = json.loads(proc.stdout)
    assert final["state"] == "succeeded" and "ticks" in proc.stderr
    failing = lab.cli("submit", "crash", "--wait", check=False, timeout=60)
    assert failing.returncode == 1 and "failed" in failing.stdout


def test_supervisor_never_imports_torch_or_transformers():
    code = (
        "import sys, pkgutil, importlib, lab_attendant\n"
        "for m in pkgutil.walk_packages(lab_attendant.__path__, 'lab_attendant.'):\n"
        "    importlib.import_module(m.name)\n"
        "import jobs.contract.kinds, jobs.contract.protocol, jobs.contract.units, jobs.contract.atomic\n"
        "from lab_attendant.cli.main import main\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', "
        "'safetensors', 'accelerate'))\n"
        "print(len([m for m in sys.modules if m.startswith('lab_attendant.')]), bad)\n"
        "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[0]) >= 10      # the walk really imported the modules


SMALL_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256, "torch_dtype": "bfloat16"}


def test_a_model_folder_without_weights_is_refused_at_submit(lab: Lab):
    """config.json alone plans (model plan) but cannot run: submit says so in one line, exit 2, nothing queued.
    A small Llama's config: the plan fits, the folder has no weights."""
    write_config(lab.root, extra='[models.bare]\n')
    (lab.root / "models" / "bare").mkdir(parents=True)
    (lab.root / "models" / "bare" / "config.json").write_text(json.dumps(SMALL_LLAMA))
    (lab.root / "archive").mkdir()
    proc = lab.cli("submit", "nightly_insights", "-p", f"archive={lab.root / 'archive'}", "-p", "model=bare",
                   check=False)
    assert proc.returncode == 2 and _rows(lab) == 0
    assert "model 'bare'" in proc.stderr and "holds no weights (no .safetensors or .gguf file)" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_a_cuda_model_with_a_cpu_torch_in_the_worker_venv_is_refused_at_submit(lab: Lab):
    """The worker venv is the real experimental venv; its torch/version.py says which build it is."""
    from lab_attendant import venv
    from tests.conftest import EXPERIMENTAL_PYTHON

    if venv.worker_torch_cuda(EXPERIMENTAL_PYTHON) != "cpu":
        pytest.skip(f"the experimental venv at {EXPERIMENTAL_PYTHON} does not hold a CPU build of torch")
    folder = lab.root / "models" / "g"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SMALL_LLAMA))
    (folder / "model.safetensors").write_bytes(b"")  # the refusal comes before anything reads it
    write_config(lab.root, python=EXPERIMENTAL_PYTHON, extra='[models.g]\ndevice = "cuda"\n')
    (lab.root / "archive").mkdir()
    proc = lab.cli("submit", "nightly_insights", "-p", f"archive={lab.root / 'archive'}", "-p", "model=g",
                   check=False)
    assert proc.returncode == 2 and _rows(lab) == 0
    assert "model 'g' has device = \"cuda\" but the worker venv's torch is a CPU build" in proc.stderr
    assert "lab-attendant venv create --force" in proc.stderr and proc.stderr.count("\n") == 1
