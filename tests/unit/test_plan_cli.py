"""`lab-attendant model plan` and the submit-time fit check, through the real CLI process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.fixtures.gguf_headers import gemma3_27b, write_header_only

ROOT = Path(__file__).resolve().parents[2]
GEMMA_27B = ROOT / "examples/configs/gemma-3-27b-it"
MIXTRAL = ROOT / "examples/configs/mixtral-8x7b-v0.1"


def test_plan_json_for_the_27b_on_the_2080ti(lab):
    out = lab.cli("model", "plan", str(GEMMA_27B), "--device-profile", "rtx2080ti", "--batch", "1",
                  "--context", "2048", "--host-ram", "16GiB", "--disk-bandwidth", "2GB", "--json")
    plan = json.loads(out.stdout)
    assert plan["fits"] is True and plan["peak_device_bytes"] <= int(10.76 * 1024**3)
    for key in ("reason", "peak_pinned_bytes", "bytes_per_pass", "bound_tokens_per_s", "weights_format",
                "bytes_by_block_type", "faster"):
        assert key in plan
    # the finding: ~47 GiB of fp16 layers per pass cannot stay in 16 GiB, so the disk bounds it
    assert plan["weights_format"] == "safetensors" and plan["from_disk"]
    assert plan["bound_tokens_per_s"] == pytest.approx(2e9 / plan["disk_bytes_per_pass"])
    assert plan["bound_tokens_per_s"] < plan["bound_from_ram_tokens_per_s"] / 5


def test_plan_table_and_refusal_exit_2_with_one_line(lab):
    table = lab.cli("model", "plan", str(MIXTRAL), "--device-profile", "rtx2080ti", "--ram-budget", "8GiB")
    assert "expert store" in table.stdout and "pinned host" in table.stdout
    refused = lab.cli("model", "plan", str(GEMMA_27B), "--device-profile", "rtx2080ti", "--batch", "8",
                      "--context", "1024", "--vram-budget", "8GiB", check=False)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "what fits instead" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("weights", ["folder", "gguf"])
def test_submit_refuses_a_model_that_cannot_fit(tmp_path, lab, weights):
    archive = tmp_path / "notes"
    archive.mkdir()
    (archive / "a.md").write_text("a note\n")
    path = GEMMA_27B
    if weights == "gguf":   # a header-only Gemma-3-27B Q4_0 file: a .gguf is a model path like a folder
        path = tmp_path / "gemma-3-27b-it-q4_0.gguf"
        write_header_only(path, *gemma3_27b("Q4_0"))
    lab.config = write_config(tmp_path, extra=f"""
[models.big]
path = "{path}"
device = "cpu"
device_memory_bytes = "4GiB"
""")
    res = lab.cli("submit", "nightly_insights", "-p", f"archive={archive}", "-p", "model=big", check=False)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "model 'big' does not fit cpu" in res.stderr and "lab-attendant model plan big" in res.stderr
    assert json.loads(lab.cli("list", "--json").stdout) == []


def test_a_config_only_qwen3_moe_folder_plans_as_moe(tmp_path, lab):
    folder = tmp_path / "qwen3-moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
        "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "torch_dtype": "bfloat16"}))
    plan = json.loads(lab.cli("model", "plan", str(folder), "--device-profile", "rtx2080ti", "--batch", "1",
                              "--json").stdout)
    assert plan["fits"] and plan["expert_cache_slots"] > 0 and plan["experts_in_ram"] > 0


class _FakeNvml:
    """pynvml's calls that local_gpu makes, answering like a PCIe 4.0 x8 card with 6 GiB free."""
    class _Memory:
        free = 6 * 1024**3

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.shutdowns = fail, 0

    def nvmlInit(self):
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self._Memory()

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (8, 6)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA GeForce RTX 3060"

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle):
        return 4

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle):
        return 8


def test_local_gpu_reads_free_memory_and_the_pcie_link_like_the_named_profiles():
    from jobs.paging.plan.profiles import PROFILES, pcie_bytes_per_s
    from lab_attendant.plan import local_gpu
    nvml = _FakeNvml()
    gpu = local_gpu(nvml)
    assert gpu.memory_bytes == 6 * 1024**3 and gpu.capability == (8, 6) and nvml.shutdowns == 1
    assert "RTX 3060" in gpu.name
    # x8 is half an x16 link of the same generation, and the same figure the rtx3060 profile uses
    assert gpu.h2d_bytes_per_s == pcie_bytes_per_s(4) / 2 == PROFILES["rtx3060"].h2d_bytes_per_s / 2
    assert local_gpu(_FakeNvml(fail=True)) is None
