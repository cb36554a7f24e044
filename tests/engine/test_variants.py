"""Per-layer precise/fast variants: the policy, the fast read path, and 4-bit Gemma-3-270M against bf16.

Measured figures (agreement, perplexities, byte ratio) are printed; run with -s to see them.
"""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch
from engine_helpers import PROMPTS, dequantized_reference, resident_greedy
from transformers import AutoModelForCausalLM

from jobs.contract.errors import BudgetError, ModelFolderError
from jobs.paging import quant
from jobs.paging.cli import generate_main
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.dense.model_store import ModelStore
from jobs.paging.dense.variants import choose_variants, summary
from jobs.paging.generate import generate
from jobs.paging.open import spec_for
from jobs.paging.quant import QuantSpec

pytestmark = pytest.mark.engine
SPEC = QuantSpec(4, 64)
NEW_TOKENS = 32
HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
AGREEMENT_PROMPTS = PROMPTS + [
    "Water boils at a lower temperature on a mountain because",
    "The most important rule of writing clear documentation is",
    "import numpy as np\n\ndef normalize(x):",
    "In 1969, the first humans to walk on the Moon were",
]


# -- policy --------------------------------------------------------------------------------------
def _letters(*args, **kwargs) -> str:
    return summary(choose_variants(*args, **kwargs))


def test_policy_modes():
    precise, fast = [100] * 6, [28] * 6
    assert _letters(6, precise, fast, "precise") == "PPPPPP"
    assert _letters(6, precise, fast, "fast") == "FFFFFF"
    assert _letters(6, precise, fast, "auto") == "PFFFFP"  # default keep_precise=1
    assert _letters(6, precise, fast, "auto", keep_precise=2) == "PPFFPP"
    assert _letters(6, precise, fast, "auto", keep_precise=0) == "FFFFFF"
    # A layer without quantized tensors (fast read not smaller) stays precise even in fast mode.
    assert _letters(6, precise, [28, 28, 100, 28, 28, 28], "fast") == "FFPFFF"


def test_policy_resident_layers_stay_precise_in_auto_only():
    precise, fast = [100] * 6, [28] * 6
    assert _letters(6, precise, fast, "auto", keep_precise=1, resident_layers=3) == "PPPFFP"
    assert _letters(6, precise, fast, "fast", resident_layers=3) == "FFFFFF"


def test_policy_budget_upgrades_from_the_edges_inward():
    precise, fast = [100] * 6, [28] * 6
    # Floor (PFFFFP) reads 2*100 + 4*28 = 312 bytes; layer 1 brings it to 384, layer 4 would be 456.
    assert _letters(6, precise, fast, "auto", stream_bytes_budget=400) == "PPFFFP"
    assert _letters(6, precise, fast, "auto", stream_bytes_budget=456) == "PPFFPP"
    assert _letters(6, precise, fast, "auto", stream_bytes_budget=10**6) == "PPPPPP"
    # Resident layers 0-1 are not read per pass: the floor is 3*28 + 100 = 184, layer 4 brings it to 256.
    assert _letters(6, precise, fast, "auto", stream_bytes_budget=256, resident_layers=2) == "PPFFPP"
    with pytest.raises(BudgetError, match="keep-precise"):
        choose_variants(6, precise, fast, "auto", stream_bytes_budget=311)


def test_policy_rejects_bad_input():
    with pytest.raises(ValueError, match="turbo"):
        choose_variants(2, [1, 1], [1, 1], "turbo")
    with pytest.raises(ValueError, match="per-layer sizes"):
        choose_variants(3, [1, 1], [1, 1], "fast")


# -- tiny checkpoint: exact fast path, original files untouched -----------------------------------
def _fingerprint(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_fast(tiny_dirs, tmp_path_factory):
    """A copy of the tiny Gemma-3 checkpoint with a q4g64 variant, and the originals' fingerprint before."""
    folder = tmp_path_factory.mktemp("tiny-variant") / "gemma3"
    shutil.copytree(tiny_dirs["gemma3"], folder)
    before = _fingerprint(folder)
    quant.write_variant(folder, SPEC)
    return folder, before


def test_quantize_leaves_original_files_unchanged(tiny_fast):
    folder, before = tiny_fast
    assert _fingerprint(folder) == before
    assert (folder / "variants" / SPEC.name / "variant.json").is_file()


# RAM budget in fp32 layers -> layers cached: the cache counts packed bytes, so one fp32 layer's
# worth holds all 4 streamed fast layers (~22 kB each against 148 kB).
@pytest.mark.parametrize("ram_layers, cached", [(0, 0), (1, 4), (5, 4)])
def test_fast_stream_matches_transformers_on_dequantized_weights(tiny_fast, ram_layers, cached):
    folder, _ = tiny_fast
    ref = dequantized_reference(folder, SPEC)
    layer_bytes = max(ModelStore(folder).layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(folder, variant="fast", vram_budget_bytes=3 * layer_bytes,
                                ram_budget_bytes=ram_layers * layer_bytes)) as fast:
        tok = fast.tokenizer
        tok.padding_side = "left"
        enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
        with torch.no_grad():
            for _ in range(2):  # the second pass comes from the RAM cache when there is one
                assert (fast.model(**enc).logits - ref(**enc).logits).abs().max().item() <= 1e-4
        stats = fast.stats()
        assert stats["variants"] == "FFFFF" and stats["streamed_layers"] == 4
        assert stats["ram_cache_layers"] == cached
        # Packed parts stay packed in the cache: uint8 codes are there, no dense fp32 projection is.
        for layer in fast._streamer._ram_cache.values():
            assert any(t.dtype == torch.uint8 for t in layer.values())
            assert not any(n.endswith("proj.weight") for n in layer)


@pytest.mark.parametrize("threads", [False, True])
def test_a_streamed_fast_layer_expands_one_matrix_at_a_time(tiny_fast, monkeypatch, threads):
    """#29: a fast layer expands into its slot weight by weight, so one expanded matrix exists at a time, as
    the memory plan counts, on cpu and on the GPU's path (the ThreadEngine); a whole layer at once held
    seven."""
    import weakref

    from jobs.paging.copy_engine import ThreadEngine
    from jobs.paging.dense import streamer

    folder, _ = tiny_fast
    alive, peak = [0], [0]
    real = streamer.dequantize_weight

    def tracked(*args, **kwargs):
        out = real(*args, **kwargs)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(out, lambda: alive.__setitem__(0, alive[0] - 1))
        return out
    monkeypatch.setattr(streamer, "dequantize_weight", tracked)
    layer_bytes = max(ModelStore(folder).layer_nbytes_as(torch.float32))
    engine = ThreadEngine() if threads else None
    try:
        # no layer resident (a resident fast layer's expanded weights are the layer: they all stay)
        with load_streamed(spec_for(folder, variant="fast", vram_budget_bytes=2 * layer_bytes + layer_bytes // 2,
                                    ram_budget_bytes=0), engine=engine) as fast:
            enc = fast.tokenizer(PROMPTS[:1], return_tensors="pt")
            with torch.no_grad():
                fast.model(**enc)
            assert fast.stats()["streamed_layers"] == 5
    finally:
        if engine is not None:
            engine.close()
    assert peak[0] == 1


def test_missing_variant_is_a_clear_error(tiny_dirs, capsys):
    with pytest.raises(ModelFolderError, match="lab-attendant model quantize llama --bits 4"):
        load_streamed(spec_for(tiny_dirs["llama"], variant="fast"))
    with pytest.raises(ValueError, match="turbo"):
        load_streamed(spec_for(tiny_dirs["llama"], variant="turbo"))
    assert generate_main(["--model", str(tiny_dirs["llama"]), "--prompt", "hi", "--variant", "auto"]) == 2
    assert "lab-attendant model quantize" in capsys.readouterr().err


# -- Gemma-3-270M: 4-bit against bf16 ------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_q4(gemma_dir):
    quant.write_variant(gemma_dir, SPEC)  # idempotent: ~20 s the first time, then a manifest check
    return gemma_dir


@pytest.fixture(scope="module")
def reference(gemma_q4):
    return AutoModelForCausalLM.from_pretrained(gemma_q4, dtype=torch.float32).eval()


def test_gemma_variant_keeps_original_sizes(gemma_q4):
    manifest = quant.Variant.open(gemma_q4, SPEC).manifest
    assert manifest["source_files"] == {p.name: p.stat().st_size for p in gemma_q4.glob("*.safetensors")}


def _perplexity(model, tokenizer) -> float:
    ids = tokenizer(HELDOUT.read_text(), return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 200  # guards the fixture: a few hundred tokens
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


@pytest.fixture(scope="module")
def q4_quality(gemma_q4, reference) -> dict[str, float]:
    """All-fast q4g64 against the bf16 weights (fp32 compute) on the same prompts and held-out text.

    Teacher-forced: the reference's greedy continuation is fed whole to the fast model, whose argmax
    at each generated position is compared with the reference token. Free-running: the fast model
    generates on its own; positions before its first divergence count as agreeing.
    """
    with load_streamed(spec_for(gemma_q4, variant="fast", dtype="fp32")) as fast:
        tok = fast.tokenizer
        assert fast.stats()["fast_layers"] == 18
        agree = total = free_agree = 0
        for prompt in AGREEMENT_PROMPTS:
            expected = resident_greedy(reference, tok, [prompt], NEW_TOKENS)[0]
            prompt_ids = tok(prompt, return_tensors="pt")["input_ids"]
            ids = torch.cat([prompt_ids, torch.tensor([expected])], dim=1)
            with torch.no_grad():
                logits = fast.model(input_ids=ids).logits[0]
            # Logits at position p predict token p+1: the generated tokens start at len(prompt).
            start = prompt_ids.shape[1] - 1
            predicted = logits[start:start + len(expected)].argmax(-1).tolist()
            agree += sum(p == e for p, e in zip(predicted, expected))
            total += len(expected)
            got = generate(fast, [prompt], max_new_tokens=NEW_TOKENS).outputs[0].token_ids
            free_agree += next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e),
                               min(len(got), len(expected)))
        quality = {"positions": total, "teacher_forced": agree / total, "free_running": free_agree / total,
                   "ppl_fast": _perplexity(fast.model, tok), "ppl_precise": _perplexity(reference, tok)}
    print(f"\nq4g64 (all 18 layers fast) vs bf16 over {total} positions: teacher-forced top-1 agreement "
          f"{quality['teacher_forced']:.3f}, free-running {quality['free_running']:.3f}; held-out perplexity "
          f"bf16 {quality['ppl_precise']:.2f}, q4g64 {quality['ppl_fast']:.2f} "
          f"({quality['ppl_fast'] / quality['ppl_precise'] - 1:+.1%})")
    return quality


@pytest.mark.slow
def test_gemma_q4_quality_floor(q4_quality):
    """Guards the fast path against breaking (a wrong dequantization gives agreement near 0).

    Floors sit below what q4g64 measured on this model (teacher-forced 0.871, perplexity +47 %).
    """
    assert q4_quality["teacher_forced"] >= 0.80
    assert q4_quality["ppl_fast"] != q4_quality["ppl_precise"]  # the fast layers really ran
    assert q4_quality["ppl_fast"] / q4_quality["ppl_precise"] <= 1.6


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 9 thresholds not met by HQQ q4g64 on Gemma-3-270M: measured "
                   "teacher-forced agreement 0.871 and perplexity +47 % (q4g32 with --variant auto: 0.902, "
                   "+9 %); strict, so this fails loudly once a better variant meets them")
def test_gemma_q4_meets_issue_thresholds(q4_quality):
    assert q4_quality["teacher_forced"] >= 0.90
    assert abs(q4_quality["ppl_fast"] / q4_quality["ppl_precise"] - 1) <= 0.10


def _bytes_per_pass(model_dir: Path, **kwargs) -> tuple[int, dict]:
    """Disk bytes of the second forward pass with every layer streamed (no prefetch: counts are exact)."""
    layer_bytes = max(ModelStore(model_dir).layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(model_dir, vram_budget_bytes=layer_bytes, **kwargs), prefetch=False) as streamed:
        enc = streamed.tokenizer(PROMPTS[:1], return_tensors="pt")
        with torch.no_grad():
            streamed.model(**enc)
            before = streamed.stats()["bytes_read"]
            streamed.model(**enc)
        stats = streamed.stats()
    assert stats["resident_layers"] == 0
    return stats["bytes_read"] - before, stats


def test_gemma_q4_reads_a_quarter_of_the_bytes_and_auto_in_between(gemma_q4):
    precise, p_stats = _bytes_per_pass(gemma_q4, variant="precise")
    fast, f_stats = _bytes_per_pass(gemma_q4, variant="fast")
    auto, a_stats = _bytes_per_pass(gemma_q4, variant="auto", keep_precise_layers=1)
    ratio = fast / precise
    print(f"\nbytes read per pass: precise {precise}, fast {fast} (ratio {ratio:.3f}), auto {auto}")
    # 4 bits per weight plus an fp16 scale and zero per 64 weights = 4.5 bits of 16 (0.281); the
    # norms come unquantized from the original, a few kB per layer.
    assert 0.22 <= ratio <= 0.34
    assert (p_stats["bytes_read_per_pass"], f_stats["bytes_read_per_pass"], a_stats["bytes_read_per_pass"]) == \
        (precise, fast, auto)
    assert p_stats["variants"] == "P" * 18 and f_stats["variants"] == "F" * 18
    assert a_stats["variants"] == "P" + "F" * 16 + "P"
    assert (a_stats["fast_layers"], a_stats["precise_layers"]) == (16, 2)
    assert fast < auto < precise
    # Packed bytes are what is handed over for fast layers (bytes_h2d stays honest).
    assert f_stats["bytes_h2d"] < 0.34 * p_stats["bytes_h2d"]


def test_gemma_auto_keeps_resident_layers_precise(gemma_q4):
    layer_bytes = max(ModelStore(gemma_q4).layer_nbytes_as(torch.float32))
    with load_streamed(spec_for(gemma_q4, variant="auto", vram_budget_bytes=5 * layer_bytes)) as streamed:
        stats = streamed.stats()
    assert stats["resident_layers"] == 3
    assert stats["variants"] == "PPP" + "F" * 14 + "P"
    store = ModelStore(gemma_q4)
    store.open_variant()
    assert stats["bytes_read_per_pass"] == sum(store.layer_nbytes_fast[3:17]) + store.layer_nbytes[17]
