"""The generate command line: JSON shape, and exit 2 with one clear message on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import REPO_ROOT

from jobs.contract.units import format_size
from jobs.paging.dense.model_store import ModelStore

pytestmark = pytest.mark.engine


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "jobs.paging.generate", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_json_output_shape(tiny_dirs):
    model_dir = tiny_dirs["llama"]
    layer_bytes = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    proc = run_cli("--model", str(model_dir), "--prompt", "Hello there", "--prompt", "The sky is",
                   "--max-new-tokens", "5", "--dtype", "fp32", "--vram-budget", str(3 * layer_bytes),
                   "--batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [o["prompt"] for o in out["outputs"]] == ["Hello there", "The sky is"]
    for o in out["outputs"]:
        assert isinstance(o["text"], str)
        assert 1 <= len(o["token_ids"]) <= 5 and all(isinstance(t, int) for t in o["token_ids"])
    stats = out["stats"]
    for key in ("bytes_read", "bytes_h2d", "io_wait_s", "compute_s", "tokens_generated", "wall_s"):
        assert key in stats
    assert stats["tokens_generated"] == sum(len(o["token_ids"]) for o in out["outputs"])
    assert stats["bytes_read"] > 0 and stats["resident_layers"] == 1


def test_budget_too_small_exits_2_before_work(tiny_dirs):
    layer_bytes = max(ModelStore(tiny_dirs["llama"]).layer_nbytes_as(torch.float32))
    proc = run_cli("--model", str(tiny_dirs["llama"]), "--prompt", "x", "--dtype", "fp32",
                   "--vram-budget", f"{layer_bytes // 2}", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"cannot hold one decoder layer of {format_size(layer_bytes)}; give at least {layer_bytes} bytes" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_non_model_folder_exits_2_naming_what_is_missing(tmp_path):
    proc = run_cli("--model", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2
    assert "no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_size_exits_2():
    proc = run_cli("--model", ".", "--prompt", "x", "--vram-budget", "lots")
    assert proc.returncode == 2 and "cannot read size" in proc.stderr


def test_moe_folder_refuses_a_dense_only_flag_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4}))
    proc = run_cli("--model", str(tmp_path), "--prompt", "x", "--vram-budget", "1GiB")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is moe and cannot honour vram_budget_bytes = 1073741824" in proc.stderr
