"""apply_kernels(): off on CPU with its reason, a clear error when Liger is insisted on where it cannot run."""
from __future__ import annotations

import pytest
import torch

from jobs.errors import KernelError
from jobs.paging.kernels import apply_kernels
from jobs.paging.layer_stream import load_streamed

pytestmark = pytest.mark.engine


def test_streamed_model_on_cpu_reports_torch_kernels_because_cpu(tiny_dirs):
    with load_streamed(tiny_dirs["gemma3"], dtype="fp32") as loaded:
        stats = loaded.stats()
        norm = loaded.model.model.norm
    assert (stats["kernels"], stats["kernels_reason"]) == ("torch", "cpu")
    assert "forward" not in vars(norm)  # nothing was bound onto the instance


def test_torch_choice_never_patches(tiny_dirs):
    with load_streamed(tiny_dirs["llama"], dtype="fp32", kernels="torch") as loaded:
        assert loaded.stats()["kernels_reason"] == "asked for torch"


def test_liger_insisted_on_cpu_is_a_clear_error_before_any_read(tiny_dirs):
    with pytest.raises(KernelError, match="kernels 'liger' cannot apply: cpu; use kernels 'auto' or 'torch'"):
        load_streamed(tiny_dirs["llama"], dtype="fp32", kernels="liger")


def test_unknown_choice_names_the_choices(tiny_dirs):
    with load_streamed(tiny_dirs["qwen2"], dtype="fp32") as loaded:
        with pytest.raises(KernelError, match="kernels 'triton' is not one of auto, liger, torch"):
            apply_kernels(loaded.model, torch.device("cpu"), "triton")


def test_paged_moe_reports_kernels_and_refuses_liger_on_cpu(tmp_path):
    from jobs.paging.moe import load_paged_moe
    from moe_helpers import save_hf, tiny_mixtral

    folder = save_hf(tiny_mixtral(), tmp_path)
    with load_paged_moe(folder) as moe:
        assert (moe.stats()["kernels"], moe.stats()["kernels_reason"]) == ("torch", "cpu")
    with pytest.raises(KernelError, match="cannot apply: cpu"):
        load_paged_moe(folder, kernels="liger")
