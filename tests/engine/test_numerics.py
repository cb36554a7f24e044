"""Numerics: dtype auto per device capability, the fp16-safe path on Gemma-3-270M against fp32, and a
non-finite hidden state or logit failing generation with a sentence instead of decoding <pad>."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import PROMPTS
from test_cli import run_cli

from jobs.contract.errors import NonFiniteError
from jobs.contract.spec import DTYPE_NAMES, ModelSettings
from jobs.paging import capability
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.generate import Sampling, generate
from jobs.paging.numerics import resolve_numerics
from jobs.paging.open import spec_for

pytestmark = pytest.mark.engine

# Not the shared PROMPTS: the fp16 path was tuned on none of these.
HIDDEN_PROMPTS = ["The largest planet in our solar system is", "To make a good cup of tea, you first",
                  "In 1969, the first humans to walk on the Moon"]
NEW_TOKENS = 16


@pytest.mark.parametrize(("capability_", "model_type", "expected"), [
    ((7, 5), "gemma3_text", (torch.float16, True)),    # Turing: fp16, and Gemma overflows it
    ((7, 5), "llama", (torch.float16, False)),
    ((8, 0), "gemma3_text", (torch.bfloat16, False)),  # Ampere: native bf16 has fp32's range
    ((9, 0), "gemma2", (torch.bfloat16, False)),
])
def test_auto_resolves_by_cuda_capability(monkeypatch, capability_, model_type, expected):
    monkeypatch.setattr(capability, "device_capability", lambda device: capability_)
    assert resolve_numerics("auto", "auto", "cuda", model_type) == expected


def test_auto_is_fp32_on_cpu_and_explicit_settings_win():
    assert ModelSettings().dtype == "auto" and ModelSettings().fp16_safe == "auto"
    assert DTYPE_NAMES == ("fp32", "bf16", "fp16")  # the concrete dtypes; "auto" is a setting only
    assert resolve_numerics("auto", "auto", "cpu", "gemma3_text") == (torch.float32, False)
    assert resolve_numerics("fp16", "off", "cpu", "gemma3_text") == (torch.float16, False)
    assert resolve_numerics("fp16", "on", "cpu", "llama") == (torch.float16, True)
    assert resolve_numerics("bf16", "on", "cpu", "gemma3_text") == (torch.bfloat16, False)


def test_layers_travel_as_stored_unless_stored_wider(gemma_dir, tiny_dirs):
    """narrow_only (the CUDA read): bf16 stays bf16 for fp32/fp16 compute; an fp32 checkpoint narrows to fp16."""
    gemma = ModelStore(gemma_dir)  # stored bf16
    for compute in (torch.float32, torch.float16):
        assert {t.dtype for t in gemma.read_layer(0, compute, narrow_only=True).values()} == {torch.bfloat16}
    assert {t.dtype for t in gemma.read_layer(0, torch.float32).values()} == {torch.float32}
    tiny = ModelStore(tiny_dirs["llama"])  # stored fp32
    assert {t.dtype for t in tiny.read_layer(0, torch.float16, narrow_only=True).values()} == {torch.float16}


def _greedy_ids(loaded, prompts) -> list[list[int]]:
    return [o.token_ids for o in generate(loaded, prompts, max_new_tokens=NEW_TOKENS, batch_size=len(prompts)).outputs]


def test_gemma_fp16_safe_matches_fp32_greedy(gemma_dir):
    with load_streamed(spec_for(gemma_dir, dtype="fp32")) as loaded:
        reference = _greedy_ids(loaded, HIDDEN_PROMPTS)
    with load_streamed(spec_for(gemma_dir, dtype="fp16")) as loaded:  # fp16_safe auto: on for Gemma
        stats = loaded.stats()
        result = generate(loaded, HIDDEN_PROMPTS, max_new_tokens=NEW_TOKENS, batch_size=len(HIDDEN_PROMPTS))
    assert (stats["dtype"], stats["fp16_safe"]) == ("fp16", True)
    assert all(o.text.strip() for o in result.outputs), [o.text for o in result.outputs]
    agree = [o.token_ids == ref for o, ref in zip(result.outputs, reference)]
    assert sum(agree) >= 2, agree


def test_gemma_fp16_unsafe_fails_naming_layer_and_setting(gemma_dir):
    proc = run_cli("--model", str(gemma_dir), "--device", "cpu", "--dtype", "fp16", "--fp16-safe", "off",
                   "--prompt", HIDDEN_PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS))
    assert proc.returncode == 1, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "decoder layer" in message and "fp16" in message and 'fp16_safe = "on"' in message, message
    assert proc.stdout == ""  # no completion printed, empty or not


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    with load_streamed(spec_for(tiny_dirs["qwen2"], dtype="fp32")) as loaded:
        yield loaded


def _poison(module, value: float, only_output: bool = True):
    def hook(mod, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[..., 0] = value
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(greedy=False, temperature=0.7, top_p=0.9)])
def test_nan_in_a_layer_fails_naming_it(tiny, sampling):
    handle = _poison(tiny.model.get_decoder().layers[2], float("nan"))
    try:
        with pytest.raises(NonFiniteError, match=r"decoder layer 2 at generation step 0, computing in fp32.*"
                                                 r'dtype = "fp32"'):
            generate(tiny, PROMPTS[:2], max_new_tokens=4, sampling=sampling)
    finally:
        handle.remove()
    assert generate(tiny, PROMPTS[:1], max_new_tokens=2).tokens_generated == 2  # hooks came off


def test_inf_logit_fails_naming_the_logits(tiny):
    handle = _poison(tiny.model.get_output_embeddings(), float("inf"))
    try:
        with pytest.raises(NonFiniteError, match="in the logits at generation step 0"):
            generate(tiny, PROMPTS[:2], max_new_tokens=4, sampling=Sampling(greedy=False, temperature=1.0))
    finally:
        handle.remove()


def test_explicit_bf16_on_a_card_without_it_is_refused_with_a_sentence(monkeypatch):
    from jobs.contract.errors import SettingError

    monkeypatch.setattr(capability, "device_capability", lambda device: (7, 5))
    with pytest.raises(SettingError, match=r'dtype "bf16" on sm_75 runs emulated .* set dtype = "auto" or "fp16"'):
        resolve_numerics("bf16", "auto", "cuda", "llama")
    monkeypatch.setattr(capability, "device_capability", lambda device: (8, 0))
    assert resolve_numerics("bf16", "auto", "cuda", "llama") == (torch.bfloat16, False)


@pytest.mark.parametrize(("capability_", "dtype", "reduced"), [
    ((7, 5), "auto", False), ((7, 5), "fp16", False), ((8, 6), "fp16", False),
    ((8, 6), "auto", True), ((7, 5), "fp32", True)])
def test_fp16_on_cuda_turns_off_cublas_reduced_precision_reduction(monkeypatch, capability_, dtype, reduced):
    """Split-K partial sums in fp16 lose digits on long dot products: off for every fp16 run on CUDA, left
    as torch has it (on) otherwise."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_fp16_reduced_precision_reduction  # a process-wide flag (no monkeypatch on it)
    try:
        matmul.allow_fp16_reduced_precision_reduction = True
        monkeypatch.setattr(capability, "device_capability", lambda device: capability_)
        resolve_numerics(dtype, "auto", "cuda", "llama")
        assert matmul.allow_fp16_reduced_precision_reduction is reduced
        monkeypatch.setattr(capability, "device_capability", lambda device: None)
        resolve_numerics("fp16", "auto", "cpu", "llama")  # the CPU: cuBLAS is not involved, nothing changes
        assert matmul.allow_fp16_reduced_precision_reduction is reduced
    finally:
        matmul.allow_fp16_reduced_precision_reduction = before


def test_sdpa_backends_leave_flash_out_below_sm_80(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "math_sdp_enabled", lambda: True)
    monkeypatch.setattr(capability, "device_capability", lambda device: (7, 5))
    assert "flash" not in capability.sdpa_backends("cuda").split(",")
    assert "efficient" in capability.sdpa_backends("cuda").split(",")
    monkeypatch.setattr(capability, "device_capability", lambda device: (8, 0))
    assert capability.sdpa_backends("cuda").split(",")[0] == "flash"
    assert capability.sdpa_backends("cpu") == "cpu"


def test_conversion_to_the_compute_dtype_fills_one_destination_a_chunk_at_a_time(monkeypatch):
    """#29: the embedding and resident layers convert into their final tensor a chunk of rows at a time
    (the only temporary is one chunk), with the values of a whole-tensor .to(dtype)."""
    from jobs.paging import dtypes

    torch.manual_seed(0)
    weight = (torch.randn(1000, 64) * 3).to(torch.bfloat16)
    sources: list[int] = []
    real_getitem = torch.Tensor.__getitem__

    def counting(self, index):   # the row slices read from the source: one per chunk
        out = real_getitem(self, index)
        if self is weight and isinstance(index, slice):
            sources.append(out.numel() * out.element_size())
        return out
    monkeypatch.setattr(torch.Tensor, "__getitem__", counting)
    out = dtypes.to_device_as(weight, torch.device("cpu"), torch.float16, chunk_bytes=64 * 128 * 2)
    monkeypatch.undo()
    assert out.dtype == torch.float16 and torch.equal(out, weight.to(torch.float16))
    assert len(sources) == 8 and max(sources) <= 64 * 128 * 2   # 1000 rows, 128 per chunk
    ids = torch.arange(5)
    assert dtypes.to_device_as(ids, torch.device("cpu"), torch.float16) is ids   # integers move as they are
    scalar = dtypes.to_device_as(torch.tensor(2.5, dtype=torch.bfloat16), torch.device("cpu"), torch.float32)
    assert scalar.dtype == torch.float32 and scalar.item() == 2.5
