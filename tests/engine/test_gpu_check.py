"""scripts/gpu-check.sh --rehearse: every step of the GPU check on the CPU, the full JSON report with the
CUDA-only values marked not measured; and the 2080 Ti emulation's bf16 guard."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
from gpu_check import NOT_MEASURED, Bf16Guard  # noqa: E402

pytestmark = pytest.mark.engine


def test_the_bf16_guard_records_bf16_compute_and_lets_conversions_pass():
    weight = torch.randn(4, 4).to(torch.bfloat16)  # stored bf16, as a real checkpoint is
    with Bf16Guard() as guard:
        as_fp16 = weight.to(torch.float16)          # reading it into the compute dtype: not bf16 compute
        _ = as_fp16 @ as_fp16
    assert guard.ops == {}
    with Bf16Guard() as guard:
        _ = weight @ weight
        _ = weight + 1
    assert set(guard.ops) == {"mm", "add"}


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_writes_the_full_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "LAB_ATTENDANT_WORKER_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", "--rehearse"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_rehearsal.json").read_text())
    steps = report["steps"]
    assert report["rehearsal"] is True and report["device"] == "cpu"
    assert list(steps) == ["tests", "env", "pcie", "nvml", "stream27", "moe", "oom"]
    assert not [name for name, step in steps.items() if "error" in step], steps
    assert steps["tests"]["failures"] == steps["tests"]["errors"] == 0
    for step, key in (("pcie", "h2d_bytes_per_s"), ("stream27", "max_memory_reserved"),
                      ("stream27", "within_plan"), ("moe", "max_memory_reserved"), ("oom", "oom_kind"),
                      ("env", "capability")):
        assert steps[step][key] == NOT_MEASURED, (step, key)
    stream = steps["stream27"]
    assert stream["prompt_tokens"] >= 2000 and stream["tokens"] >= 1 and stream["bf16_ops"] == {}
    assert stream["plan_peak_device_bytes"] > 0 and stream["bytes_h2d"] > 0
    moe = steps["moe"]
    assert moe["logits_finite"] and moe["experts_from_disk"] > 0 and moe["bf16_ops"] == {}
    assert moe["host_ram_bytes"] <= moe["ram_budget_bytes"]
    assert "flash" not in steps["env"]["emulation"]["sdpa_backends"]
