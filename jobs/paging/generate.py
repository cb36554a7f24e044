"""Batched text generation over a streamed (or paged) causal LM (its command line: cli.generate_main).

Owns the decode loop: left padding, KV cache, greedy / top-p sampling, stop strings, progress, timing, and
failing on a non-finite hidden state or logit (numerics.NonFiniteWatch) in the step's one host sync.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from jobs.contract.errors import BudgetError
from jobs.contract.spec import DEFAULT_BATCH_SIZE
from jobs.contract.units import format_size
from jobs.paging.kv_cache import DEFAULT_RESIDUAL_TOKENS, kv_cache_nbytes, make_cache
from jobs.paging.numerics import NonFiniteWatch, non_finite_error

ProgressFn = Callable[[int, int], None]


class LoadedModel(Protocol):
    """What generate() needs; StreamedModel (layer_stream) and the MoE pager both provide it."""

    model: Any
    tokenizer: Any
    device: torch.device

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def __enter__(self) -> LoadedModel: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0   # divides the logits before softmax; only when not greedy
    top_p: float = 1.0         # nucleus mass kept; 1.0 keeps the whole distribution
    seed: int = 0              # seeds a generator private to this call
    no_repeat_ngram_size: int = 0  # > 0: a row never repeats one of its generated n-grams (0: off)

    def __post_init__(self) -> None:
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0 turns it off)")


@dataclass
class Completion:
    prompt: str
    text: str                  # generated text only, cut before the first stop string
    token_ids: list[int]       # generated ids only (an EOS that ended the text included)


@dataclass
class GenerationResult:
    outputs: list[Completion]
    prompt_tokens: int = 0
    tokens_generated: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float = 0.0
    weight_passes: int = 0     # forward calls; each streams the weights once, whatever the batch
    batch_sizes: list[int] = field(default_factory=list)
    kv_cache: str = "fp"       # fp | int8 | fp8 (jobs.paging.kv_cache)
    kv_cache_peak_bytes: int = 0  # largest cache any batch held, measured after each step


def generate(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = DEFAULT_BATCH_SIZE, sampling: Sampling = Sampling(), stop: Sequence[str] = (),
             progress: ProgressFn | None = None, kv_cache: str = "fp",
             kv_residual: int = DEFAULT_RESIDUAL_TOKENS) -> GenerationResult:
    """Complete every prompt; a batch's prefill and each decode step cost one pass over the weights.

    progress(done, total) counts generated-token slots: total = len(prompts) * max_new_tokens.
    kv_cache picks the cache storage (fp, int8, fp8); kv_residual is int8's full-precision window in tokens.
    Raises NonFiniteError when a decoder layer's output or a logit becomes inf/NaN (e.g. fp16 overflow).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    make_cache(loaded.model.config, kv_cache, residual_length=kv_residual,  # bad kinds fail before any work
               device=loaded.device)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"  # new tokens must line up at the right edge of every row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_ids_of(loaded.model, tokenizer)
    generator = torch.Generator(device=loaded.device).manual_seed(sampling.seed)
    result = GenerationResult(outputs=[], kv_cache=kv_cache)
    total = len(prompts) * max_new_tokens
    start = time.perf_counter()
    watch = NonFiniteWatch(loaded.model)
    try:
        for first in range(0, len(prompts), batch_size):
            batch = list(prompts[first:first + batch_size])
            done_before = first * max_new_tokens

            def batch_progress(done_in_batch: int) -> None:
                if progress is not None:
                    progress(done_before + done_in_batch, total)

            cache = make_cache(loaded.model.config, kv_cache, residual_length=kv_residual,
                               device=loaded.device)
            _generate_batch(loaded, batch, max_new_tokens, sampling, stop, pad_id, eos_ids, generator,
                            result, batch_progress, cache, watch)
    finally:
        watch.remove()
    result.wall_s = time.perf_counter() - start
    return result


def check_planned(loaded: LoadedModel, rows: int, tokens: int) -> None:
    """BudgetError when a batch's KV cache and activations exceed what the memory plan reserved for
    batch x context_tokens: a budget, not a cap per dimension (16 rows of 46 tokens fit a plan for 8 x 2048)."""
    plan = getattr(loaded, "plan", None)
    if plan is None or plan.batch_fits(rows, tokens):
        return
    batch, context = plan.request["batch"], plan.request["context"]
    raise BudgetError(f"a batch of {rows} rows x {tokens} tokens (prompt + new) needs "
                      f"{format_size(plan.batch_memory_bytes(rows, tokens))} of KV cache and activations, more "
                      f"than the memory plan reserved for {batch} x {context} "
                      f"({format_size(plan.batch_memory_bytes(batch, context))}): raise context_tokens (or "
                      "batch_size) in the model's table after `lab-attendant model plan NAME --context N` shows "
                      "it fits, or use smaller batches or shorter inputs")


@torch.no_grad()
def _generate_batch(loaded: LoadedModel, prompts: list[str], max_new_tokens: int, sampling: Sampling,
                    stop: Sequence[str], pad_id: int, eos_ids: set[int], generator: torch.Generator,
                    result: GenerationResult, progress: Callable[[int], None], cache: Any,
                    watch: NonFiniteWatch) -> None:
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    # Same positions as transformers' generate for left-padded rows, so outputs match it exactly.
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 0)
    rows = len(prompts)
    check_planned(loaded, rows, input_ids.shape[1] + max_new_tokens)
    generated: list[list[int]] = [[] for _ in range(rows)]
    texts: list[str | None] = [None] * rows  # set when a row finishes
    result.prompt_tokens += int(mask.sum())
    result.batch_sizes.append(rows)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        result.kv_cache_peak_bytes = max(result.kv_cache_peak_bytes, kv_cache_nbytes(cache))
        logits = out.logits[:, -1, :].float()
        finite = torch.isfinite(logits).all(dim=-1)
        if sampling.no_repeat_ngram_size:
            _ban_repeats(logits, generated, sampling.no_repeat_ngram_size)
        # The flags ride on the picked ids' one device->host copy: detection costs no extra sync.
        read = torch.cat([_pick(logits, finite, sampling, generator), watch.flags.long(), (~finite).long()]).tolist()
        next_ids, flags = read[:rows], read[rows:]
        if any(flags):
            raise non_finite_error(flags[:-rows], step, watch.dtype, getattr(loaded, "fp16_safe", False))
        elapsed = time.perf_counter() - t0
        if step == 0:
            result.prefill_s += elapsed
        else:
            result.decode_s += elapsed
        result.weight_passes += 1
        for row, token in enumerate(next_ids):
            if texts[row] is not None:
                next_ids[row] = pad_id  # finished rows ride along with padding, like transformers
                continue
            generated[row].append(token)
            result.tokens_generated += 1
            texts[row] = _finished_text(tokenizer, generated[row], token, eos_ids, stop)
        progress(sum(max_new_tokens if t is not None else len(g) for t, g in zip(texts, generated)))
        if all(t is not None for t in texts):
            break
        input_ids = torch.tensor(next_ids, device=device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
    progress(rows * max_new_tokens)
    for row, prompt in enumerate(prompts):
        text = texts[row]
        if text is None:
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
        result.outputs.append(Completion(prompt=prompt, text=text, token_ids=generated[row]))


def _ban_repeats(logits: torch.Tensor, generated: list[list[int]], n: int) -> None:
    """Set to -inf every token that would complete an n-gram the row already generated (the prompt's
    own n-grams stay allowed: few-shot prompts share phrasing with the answer on purpose)."""
    for row, ids in enumerate(generated):
        if len(ids) < n:
            continue
        tail = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
        banned = {ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == tail}
        if banned:
            logits[row, list(banned)] = float("-inf")


def _finished_text(tokenizer: Any, ids: list[int], last: int, eos_ids: set[int],
                   stop: Sequence[str]) -> str | None:
    """The row's final text if it just ended (EOS or a stop string), else None."""
    if last in eos_ids:
        return tokenizer.decode(ids, skip_special_tokens=True)
    if stop:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            return text[:min(cuts)]
    return None


def _pick(logits: torch.Tensor, finite: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Token ids per row; a row with a non-finite logit samples from zeros (its pick is discarded: the step
    raises), because torch.multinomial on NaN is a device-side assert on CUDA."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = torch.where(finite.unsqueeze(1), logits, 0.0)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def eos_ids_of(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


if __name__ == "__main__":  # python -m jobs.paging.generate: the flags live in cli.py
    from jobs.paging.cli import generate_main
    raise SystemExit(generate_main())
