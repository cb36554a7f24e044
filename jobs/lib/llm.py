"""The one model helper the job kinds share: open the run's model (jobs.paging.open: dense -> layer
streaming, moe -> expert pager), complete prompts in batches, score answer options, report engine metrics."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from jobs.contract.errors import ModelUnavailable, NonFiniteError
from jobs.contract.spec import ModelSpec
from jobs.lib import grounded
from jobs.paging.generate import GenerationResult, Sampling, check_planned, generate
from jobs.paging.open import open_model

ProgressFn = Callable[[int, int], None]


class Engine:
    """A loaded model bound to a run's context: every call reports tokens/s and engine stats."""

    def __init__(self, ctx, model_spec: ModelSpec, *, batch_size: int) -> None:
        self.ctx, self.batch_size = ctx, batch_size
        self.name = model_spec.name
        self.kv_cache = model_spec.kv_cache
        self.kv_cache_peak_bytes = 0
        path = Path(model_spec.path)
        if not (path.suffix == ".gguf" and path.is_file()) and not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"model '{self.name}' path {model_spec.path} is neither a GGUF file nor a folder with config.json; "
                f"run `lab-attendant model import-default` for the embedded model, or fix [models.{self.name}] path")
        start = time.perf_counter()
        self.loaded = open_model(model_spec, batch_size=batch_size)
        self.load_s = time.perf_counter() - start
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.busy_s = 0.0
        ctx.log.info("model %s loaded in %.1f s", self.name, self.load_s)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 progress: ProgressFn | None = None, no_repeat_ngram_size: int = 0) -> list[str]:
        """Greedy completions, one per prompt (text only, stripped); no_repeat_ngram_size > 0 keeps
        a completion from repeating its own n-grams (small models loop)."""
        if not prompts:
            return []
        res = self.run(prompts, max_new_tokens=max_new_tokens, stop=stop, progress=progress,
                       sampling=Sampling(no_repeat_ngram_size=no_repeat_ngram_size))
        return [c.text.strip() for c in res.outputs]

    def guarded(self, asks: Sequence[grounded.Ask], *, max_new_tokens: int,
                progress: ProgressFn | None = None) -> list[grounded.Answer]:
        """The kinds' checked one-line fields: grounded.generate over one-line completions (stop at the
        newline, no repeated trigrams: the small default model loops otherwise)."""
        return grounded.generate(asks, lambda prompts: self.complete(
            prompts, max_new_tokens=max_new_tokens, stop=("\n",), no_repeat_ngram_size=3, progress=progress))

    def run(self, prompts: Sequence[str], *, max_new_tokens: int, sampling: Sampling = Sampling(),
            stop: Sequence[str] = (), progress: ProgressFn | None = None) -> GenerationResult:
        """The engine's own generate() on this model (its batch size and KV cache), accounted."""
        res = generate(self.loaded, list(prompts), max_new_tokens=max_new_tokens, sampling=sampling,
                       batch_size=self.batch_size, stop=stop, progress=progress, kv_cache=self.kv_cache)
        self.kv_cache_peak_bytes = max(self.kv_cache_peak_bytes, res.kv_cache_peak_bytes)
        self.tokens_generated += res.tokens_generated
        self.prompt_tokens += res.prompt_tokens
        self.busy_s += res.wall_s
        self.report()
        return res

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str],
                        progress: ProgressFn | None = None) -> list[dict[str, float]]:
        """Log-probability of each option's first token right after each prompt (one prefill
        pass per batch, no decoding), for scores that do not depend on parsing free text."""
        tok, model, device = self.loaded.tokenizer, self.loaded.model, self.loaded.device
        tok.padding_side = "left"
        ids = {o: tok(o, add_special_tokens=False)["input_ids"][0] for o in options}
        out: list[dict[str, float]] = []
        start = time.perf_counter()
        for first in range(0, len(prompts), self.batch_size):
            enc = tok(list(prompts[first:first + self.batch_size]), return_tensors="pt",
                      padding=True)
            mask = enc["attention_mask"].to(device)
            check_planned(self.loaded, mask.shape[0], mask.shape[1])
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = model(input_ids=enc["input_ids"].to(device), attention_mask=mask,
                           position_ids=positions, use_cache=False, logits_to_keep=1).logits
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
            scores = logp[:, list(ids.values())].tolist()   # the one sync of this batch
            if not all(math.isfinite(x) for row in scores for x in row):
                raise NonFiniteError(
                    f"non-finite option scores (inf/NaN logits) from model '{self.name}' computing in "
                    f"{self.loaded.stats().get('dtype', '?')}: set fp16_safe = \"on\" or dtype = "
                    f"\"fp32\" in [models.{self.name}]")
            out += [dict(zip(ids, row)) for row in scores]
            self.prompt_tokens += int(mask.sum())
            if progress:
                progress(len(out), len(prompts))
        self.busy_s += time.perf_counter() - start
        self.report()
        return out

    def summary(self) -> dict[str, Any]:
        # Scalars only (the per-layer tables stay out); strings name the variants and kernels chosen.
        stats = {k: v for k, v in self.loaded.stats().items() if isinstance(v, (int, float, bool, str))}
        return {"model": self.name, "model_load_s": round(self.load_s, 3),
                "kv_cache": self.kv_cache, "kv_cache_peak_bytes": self.kv_cache_peak_bytes,
                "tokens_generated": self.tokens_generated, "prompt_tokens": self.prompt_tokens,
                "engine_busy_s": round(self.busy_s, 3),
                "tokens_per_s": round(self.tokens_generated / self.busy_s, 3) if self.busy_s else None,
                "prompt_tokens_per_s": (round(self.prompt_tokens / self.busy_s, 3)
                                        if self.busy_s else None),
                **{f"engine_{k}": v for k, v in stats.items()}}

    def account(self, *, prompt_tokens: int, busy_s: float) -> None:
        """Work a job did on self.loaded.model by its own passes (kv_rank_study), counted like ours."""
        self.prompt_tokens += prompt_tokens
        self.busy_s += busy_s
        self.report()

    def report(self) -> None:
        self.ctx.metric(**self.summary())

    def close(self) -> None:
        self.loaded.close()


def first_sentence(text: str, limit_chars: int = 240) -> str:
    """Cut a completion at its first sentence end; small base models ramble on."""
    text = " ".join(text.split())
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[:i + 1]
    return text[:limit_chars]
