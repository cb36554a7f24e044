"""open_model: the ModelSpec's settings reach the engine of its kind, and the ones it cannot honour are refused."""
from __future__ import annotations

import json
import os

import pytest
from moe_helpers import expert_bytes, save_hf, tiny_mixtral

from jobs.contract.errors import BudgetError, SettingError
from jobs.contract.spec import ModelSpec
from jobs.paging.open import open_model
from jobs.paging.plan.settings import is_moe_folder

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("kind, setting, value", [
    ("moe", "vram_budget_bytes", 2**30), ("moe", "keep_precise_layers", 3),
    ("dense", "expert_cache_bytes", 2**30), ("dense", "cache_policy", "lfu")])
def test_a_setting_the_engine_cannot_honour_is_refused_before_loading(tmp_path, kind, setting, value):
    spec = ModelSpec(name="m", path=str(tmp_path / "never-read"), kind=kind, **{setting: value})
    with pytest.raises(SettingError, match=f"model 'm' is {kind} and cannot honour {setting} = {value!r}"):
        open_model(spec)


def test_moe_spec_settings_reach_the_pager(tmp_path):
    model = tiny_mixtral()
    folder = save_hf(model, tmp_path / "mix")
    spec = ModelSpec(name="mix", path=str(folder), kind="moe", expert_cache_bytes=2 * expert_bytes(model),
                     cache_policy="lfu", kernels="torch", variant="auto")
    with open_model(spec, prefetch=False) as paged:
        stats = paged.stats()
    assert (stats["policy"], stats["capacity_experts"]) == ("lfu", 2)
    assert (stats["kernels"], stats["kernels_reason"]) == ("torch", "asked for torch")
    assert stats["expert_variant"] == "precise"  # auto without a written variant
    assert stats["dtype"] == "fp32"                # dtype auto resolved on the CPU
    assert paged.pager.prefetch is False
    # ram_budget_bytes is honoured as the expert store's host RAM bound, not dropped.
    with pytest.raises(BudgetError, match="ram_budget_bytes is 1000"):
        open_model(ModelSpec(name="mix", path=str(folder), kind="moe", ram_budget_bytes=1000))


def test_is_moe_folder_reads_the_text_config_too(tmp_path):
    assert not is_moe_folder(tmp_path)                      # no config.json: the dense engine says so
    (tmp_path / "config.json").write_text("not json")
    assert not is_moe_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_local_experts": 8}}))
    assert is_moe_folder(tmp_path)


def test_cuda_runs_get_expandable_segments_unless_the_user_chose(monkeypatch):
    """#29: PYTORCH_CUDA_ALLOC_CONF is set before the run's first CUDA allocation, a user's value is kept,
    and a cpu run leaves the environment alone."""
    import torch

    from jobs.paging import runtime

    monkeypatch.delenv(runtime.ALLOC_CONF_ENV, raising=False)
    assert runtime.configure_cuda_allocator(torch.device("cpu")) is None
    assert runtime.ALLOC_CONF_ENV not in os.environ
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert runtime.configure_cuda_allocator(torch.device("cuda")) == "expandable_segments:True"
    assert os.environ[runtime.ALLOC_CONF_ENV] == "expandable_segments:True"
    monkeypatch.setenv(runtime.ALLOC_CONF_ENV, "max_split_size_mb:128")
    assert runtime.configure_cuda_allocator(torch.device("cuda")) == "max_split_size_mb:128"
    monkeypatch.delenv(runtime.ALLOC_CONF_ENV)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)   # too late: said, not pretended
    assert runtime.configure_cuda_allocator(torch.device("cuda")) is None
    assert runtime.ALLOC_CONF_ENV not in os.environ
