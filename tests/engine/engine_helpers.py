"""Shared checks for the engine tests: compare a streamed model with transformers' resident one.

Kept out of conftest so test modules import it explicitly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "The three primary colors are red,",
]


def find_test_model() -> Path:
    """$LAB_ATTENDANT_TEST_MODEL, else the embedded default (models/gemma-3-270m), converted on first use
    (the test script pre-converts)."""
    env = os.environ.get("LAB_ATTENDANT_TEST_MODEL")
    if env:
        return Path(env)
    from jobs.paging.convert import convert_default

    return convert_default()


def resident_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def resident_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Generated ids per prompt from transformers' own generate, cut after the first EOS like ours."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def dequantized_reference(folder: Path, spec):
    """transformers' own model, unstreamed, with every weight of the folder's variant `spec` (a quant.QuantSpec)
    replaced by its dequantized value: what a stream of fast layers must equal."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from jobs.paging import quant

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    variant = quant.Variant.open(folder, spec)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, shape in variant.shapes.items():
            with safe_open(str(variant.file_of[key]), framework="pt") as f:
                parts = {p: f.get_tensor(f"{key}.{p}") for p in quant.PARTS}
            params[key].copy_(quant.dequantize_weight(parts, shape, spec, torch.float32))
    return model


def header_sizes(path: Path) -> dict[str, int]:
    """Bytes of each tensor according to a safetensors header, parsed independently of the engine."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
