"""apply_kernels(): off on CPU with its reason, refused on sm_75 in bf16, a failed warm-up undone, a clear error
when Liger is insisted on where it cannot run, and what runs attention in the stats."""
from __future__ import annotations

import sys

import pytest
import torch

from jobs.contract.errors import KernelError
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.kernels import apply_kernels
from jobs.paging.open import spec_for

pytestmark = pytest.mark.engine


def test_streamed_model_on_cpu_reports_torch_kernels_because_cpu(tiny_dirs):
    with load_streamed(spec_for(tiny_dirs["gemma3"], dtype="fp32")) as loaded:
        stats = loaded.stats()
        norm = loaded.model.model.norm
    assert (stats["kernels"], stats["kernels_reason"]) == ("torch", "cpu")
    assert "forward" not in vars(norm)  # nothing was bound onto the instance


def test_torch_choice_never_patches(tiny_dirs):
    with load_streamed(spec_for(tiny_dirs["llama"], dtype="fp32", kernels="torch")) as loaded:
        assert loaded.stats()["kernels_reason"] == "asked for torch"


def test_liger_insisted_on_cpu_is_a_clear_error_before_any_read(tiny_dirs):
    with pytest.raises(KernelError, match="kernels 'liger' cannot apply: cpu; use kernels 'auto' or 'torch'"):
        load_streamed(spec_for(tiny_dirs["llama"], dtype="fp32", kernels="liger"))


def test_unknown_choice_names_the_choices(tiny_dirs):
    with load_streamed(spec_for(tiny_dirs["qwen2"], dtype="fp32")) as loaded:
        with pytest.raises(KernelError, match="kernels 'triton' is not one of auto, liger, torch"):
            apply_kernels(loaded.model, torch.device("cpu"), "triton")


def test_paged_moe_reports_kernels_attention_and_refuses_liger_on_cpu(tmp_path):
    from moe_helpers import save_hf, tiny_mixtral

    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    folder = save_hf(tiny_mixtral(), tmp_path)
    with load_paged_moe(spec_for(folder)) as moe:
        stats = moe.stats()
        assert (stats["kernels"], stats["kernels_reason"], stats["sdpa_backends"]) == ("torch", "cpu", "cpu")
        assert stats["attn_implementation"] == moe.model.config._attn_implementation
    with pytest.raises(KernelError, match="cannot apply: cpu"):
        load_paged_moe(spec_for(folder, kernels="liger"))


def _tiny_llama(dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def turing(monkeypatch):
    """capability answers as an RTX 2080 Ti (sm_75) would for any CUDA device; the CPU stays the CPU."""
    from jobs.paging import capability

    monkeypatch.setattr(capability, "device_capability",
                        lambda device: (7, 5) if torch.device(device).type == "cuda" else None)


def test_liger_refused_on_sm75_in_bf16_with_the_reason_in_stats(turing):
    model = _tiny_llama(torch.bfloat16)
    applied = apply_kernels(model, "cuda", "auto")
    assert applied["kernels"] == "torch"
    assert applied["kernels_reason"].startswith("sm_75 has no bf16 in Triton (needs sm_80+)")
    assert "forward" not in vars(model.model.norm)
    with pytest.raises(KernelError, match=r"cannot apply: sm_75 has no bf16 in Triton.*use kernels 'auto' or 'torch'"):
        apply_kernels(model, "cuda", "liger")
    # fp16 passes the Triton gate at sm_75; what stops it next is not the arch.
    assert "Triton" not in apply_kernels(_tiny_llama(torch.float16), "cuda", "auto")["kernels_reason"]


def test_failed_warm_up_falls_back_to_torch_kernels_and_undoes_the_patch(monkeypatch):
    """A Liger patch whose kernels fail at their first launch (Triton cannot build them here): the model runs
    transformers' own code again, and the stats say why."""
    import types

    from jobs.paging import kernels

    model = _tiny_llama(torch.float32)
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        before = model(ids).logits
    modeling = sys.modules[type(model).__module__]
    rope = modeling.apply_rotary_pos_emb

    def fake_patch(m):  # what Liger's instance patching does: bound forwards, a rebound module function
        for module in m.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = types.MethodType(lambda self, x: x * 0, module)
                module.casting_mode = "gemma"
        modeling.apply_rotary_pos_emb = lambda *a, **k: None

    def failing_warm_up(model_type, device, dtype):
        raise RuntimeError("PTX .bf16 requires sm_80")

    monkeypatch.setattr(kernels, "why_not_liger", lambda *a: None)
    monkeypatch.setattr(kernels, "_patch_instance", fake_patch)
    monkeypatch.setattr(kernels, "_warm_up", failing_warm_up)
    applied = apply_kernels(model, "cuda", "auto")
    assert applied["kernels"] == "torch"
    assert applied["kernels_reason"] == "Liger warm-up failed on cuda in fp32: RuntimeError: PTX .bf16 requires sm_80"
    assert modeling.apply_rotary_pos_emb is rope
    assert not any("forward" in vars(m) or "casting_mode" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(KernelError, match="cannot apply: Liger warm-up failed"):
        apply_kernels(model, "cuda", "liger")


def test_stats_name_the_attention_implementation_and_sdpa_backends(tiny_dirs):
    with load_streamed(spec_for(tiny_dirs["llama"], dtype="fp32")) as loaded:
        stats = loaded.stats()
        assert stats["attn_implementation"] == loaded.model.config._attn_implementation == "sdpa"
        assert stats["sdpa_backends"] == "cpu"
    model = _tiny_llama(torch.float32)
    report = apply_kernels(model, "cuda", "torch")  # CUDA's backend flags are readable without a card
    assert set(report["sdpa_backends"].split(",")) <= {"flash", "efficient", "cudnn", "math", "none"}
