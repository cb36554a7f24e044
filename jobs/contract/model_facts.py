"""What a kind's submit-time check may ask of its model, read without torch: the attention head size and
whether a chat template ships with it (stdlib only; the supervisor fills it from a GGUF header itself)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFacts:
    where: str                          # the folder or file, for messages
    head_dim: int | None = None         # None: unknown (the check that needs it is skipped)
    has_chat_template: bool | None = None

    @classmethod
    def of_folder(cls, model_dir: str | Path) -> "ModelFacts":
        """From a Hugging Face folder's config.json (text_config first) and tokenizer files."""
        folder = Path(model_dir)
        return cls(str(folder), _head_dim(folder), _chat_template(folder))


def _head_dim(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") or config
    if text.get("head_dim"):
        return int(text["head_dim"])
    if text.get("hidden_size") and text.get("num_attention_heads"):
        return int(text["hidden_size"]) // int(text["num_attention_heads"])
    return None


def _chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text()).get("chat_template")) if cfg.is_file() else False
    except (OSError, ValueError):
        return False
