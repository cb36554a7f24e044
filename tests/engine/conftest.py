"""Fixtures for the engine tests: the converted Gemma-3-270M folder and tiny random checkpoints.

Tiny models get a small byte-level BPE tokenizer trained here: Gemma's takes seconds to load each time.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

try:
    import torch
    import transformers
    from engine_helpers import PROMPTS, find_test_model
except ImportError:  # the supervisor's venv: these tests need the experimental one
    collect_ignore_glob = ["test_*.py"]
    NEEDS_EXPERIMENTAL_VENV = (
        "tests/engine not run: the engine tests need the experimental venv (torch, transformers); "
        "run them with `venvs/experimental/bin/python -m pytest tests/engine` "
        "(create it with `lab-attendant venv create`)")

    def pytest_collection_finish(session: pytest.Session) -> None:
        # Said at the top and again in the summary, so a bare `pytest` never passes by silently
        # collecting nothing here.
        session.config.get_terminal_writer().line(NEEDS_EXPERIMENTAL_VENV, yellow=True)

    def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's hook
        terminalreporter.write_sep("=", "engine tests skipped", yellow=True)
        terminalreporter.write_line(NEEDS_EXPERIMENTAL_VENV)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TINY_VOCAB = 384


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    return find_test_model()


def _tiny_config(kind: str):
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "gemma3":
        # A 6-token sliding window makes the sliding layers differ from full attention on our prompts.
        return transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=6,
                                             layer_types=["sliding_attention", "sliding_attention",
                                                          "full_attention", "sliding_attention",
                                                          "full_attention"])
    raise ValueError(kind)


def _train_tiny_tokenizer(dest: Path) -> Path:
    """Byte-level BPE (any text encodes) with Gemma's special-token ids: pad 0, eos 1, bos 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 32, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>")
    fast.save_pretrained(dest)
    return dest


def _copy_tokenizer(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dest / name)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random tiny checkpoints: sharded Llama and Qwen2, Gemma-3 plain and under multimodal prefixes.

    Each value is the folder to stream; "<kind>-ref" is the plain folder transformers loads as reference.
    """
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("tiny")
    tokenizer_dir = _train_tiny_tokenizer(root / "tokenizer")
    dirs: dict[str, Path] = {}
    for seed, kind in enumerate(("llama", "qwen2", "gemma3")):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(_tiny_config(kind), dtype=torch.float32)
        out = root / kind
        # Small shards so one layer's tensors can span two files.
        model.save_pretrained(out, max_shard_size="300KB" if kind != "gemma3" else "5GB")
        _copy_tokenizer(tokenizer_dir, out)
        dirs[kind] = dirs[kind + "-ref"] = out
    for prefix in ("language_model.model.", "model.language_model."):
        dirs[prefix] = _write_multimodal_layout(root, dirs["gemma3"], prefix, load_file, save_file)
        _copy_tokenizer(tokenizer_dir, dirs[prefix])
    return dirs


def _write_multimodal_layout(root: Path, plain: Path, prefix: str, load_file, save_file) -> Path:
    """The tiny Gemma-3 weights renamed as Gemma3ForConditionalGeneration stores them, plus a vision tensor."""
    out = root / ("mm-" + prefix.strip("."))
    out.mkdir()
    state = load_file(str(plain / "model.safetensors"))
    renamed = {prefix + k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    renamed[prefix.split(".")[0] + ".vision_tower.never_read.weight" if prefix.startswith("model.")
            else "vision_tower.never_read.weight"] = torch.ones(3)
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((plain / "config.json").read_text())
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    config.save_pretrained(out)
    return out


