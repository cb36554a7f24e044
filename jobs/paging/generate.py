"""Batched text generation over a streamed (or paged) causal LM, and its command line.

Owns the decode loop: left padding, KV cache, greedy / top-p sampling, stop strings, progress, timing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from jobs.paging.kv_cache import DEFAULT_RESIDUAL_TOKENS, KV_KINDS, kv_cache_nbytes, make_cache
from jobs.paging.variants import MODES

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


class LoadedModel(Protocol):
    """What generate() needs; StreamedModel (layer_stream) and the MoE pager both provide it."""

    model: Any
    tokenizer: Any
    device: torch.device

    def stats(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0   # divides the logits before softmax; only when not greedy
    top_p: float = 1.0         # nucleus mass kept; 1.0 keeps the whole distribution
    seed: int = 0              # seeds a generator private to this call

    def __post_init__(self) -> None:
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")


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


def generate(loaded: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             sampling: Sampling = Sampling(), stop: Sequence[str] = (),
             progress: ProgressFn | None = None, kv_cache: str = "fp",
             kv_residual: int = DEFAULT_RESIDUAL_TOKENS) -> GenerationResult:
    """Complete every prompt; a batch's prefill and each decode step cost one pass over the weights.

    progress(done, total) counts generated-token slots: total = len(prompts) * max_new_tokens.
    kv_cache picks the cache storage (fp, int8, fp8); kv_residual is int8's full-precision window in tokens.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    make_cache(loaded.model.config, kv_cache, residual_length=kv_residual)  # bad kinds fail before any work
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"  # new tokens must line up at the right edge of every row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(loaded.model, tokenizer)
    generator = torch.Generator(device=loaded.device).manual_seed(sampling.seed)
    result = GenerationResult(outputs=[], kv_cache=kv_cache)
    total = len(prompts) * max_new_tokens
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = list(prompts[first:first + batch_size])
        done_before = first * max_new_tokens

        def batch_progress(done_in_batch: int) -> None:
            if progress is not None:
                progress(done_before + done_in_batch, total)

        cache = make_cache(loaded.model.config, kv_cache, residual_length=kv_residual)
        _generate_batch(loaded, batch, max_new_tokens, sampling, stop, pad_id, eos_ids, generator,
                        result, batch_progress, cache)
    result.wall_s = time.perf_counter() - start
    return result


@torch.no_grad()
def _generate_batch(loaded: LoadedModel, prompts: list[str], max_new_tokens: int, sampling: Sampling,
                    stop: Sequence[str], pad_id: int, eos_ids: set[int], generator: torch.Generator,
                    result: GenerationResult, progress: Callable[[int], None], cache: Any = None) -> None:
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    # Same positions as transformers' generate for left-padded rows, so outputs match it exactly.
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 0)
    rows = len(prompts)
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
        next_ids = _pick(out.logits[:, -1, :].float(), sampling, generator).tolist()
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


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


# -- command line ---------------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad command-line input; reported as one line on stderr with exit status 2."""


def _size(text: str) -> int:
    from jobs.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.paging.generate",
                                description="Generate completions with a layer-streamed (or expert-paged) model.")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line (.jsonl: objects with 'prompt')")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample with this temperature instead of greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="compute dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--vram-budget", type=_size, help="bytes of decoder layers on the device (e.g. 2GiB)")
    p.add_argument("--ram-budget", type=_size, help="bytes of streamed layers cached in host RAM")
    p.add_argument("--no-prefetch", action="store_true", help="read each layer only when it is needed")
    p.add_argument("--expert-cache-bytes", type=_size, help="MoE only: device bytes for cached experts")
    p.add_argument("--cache-policy", choices=("lru", "lfu"), default="lru", help="MoE only: expert eviction")
    p.add_argument("--variant", choices=MODES, default="precise",
                   help="precise (original weights), fast (the 4-bit variant written by `lab-attendant model "
                        "quantize`), auto (dense: first/last --keep-precise layers precise, rest fast; "
                        "MoE: 4-bit experts when the folder has a variant)")
    p.add_argument("--keep-precise", type=int, default=1, help="with --variant auto: precise layers at each end")
    p.add_argument("--kv-cache", choices=KV_KINDS, default="fp",
                   help="KV cache storage: int8 (HQQ 8-bit) or fp8 (e4m3; faster only on Hopper+ GPUs)")
    p.add_argument("--kv-residual", type=int, default=DEFAULT_RESIDUAL_TOKENS,
                   help="int8 only: newest tokens kept unquantized before they are folded in")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine progress to stderr")
    return p


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    path: Path = args.prompts_file
    if not path.is_file():
        raise UsageError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: every line must be a JSON object with a 'prompt' string ({exc})") from None
    if not lines:
        raise UsageError(f"prompts file {path} holds no prompts")
    return lines


def _sampling(args: argparse.Namespace) -> Sampling:
    if args.temperature is None:
        return Sampling(greedy=True, seed=args.seed)
    if args.greedy:
        raise UsageError("--greedy and --temperature exclude each other")
    return Sampling(greedy=False, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _is_moe(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False  # load_streamed reports what is wrong with the folder
    return "num_local_experts" in config or "num_local_experts" in config.get("text_config", {})


def load_for_cli(args: argparse.Namespace) -> LoadedModel:
    """Dense folders stream layers; Mixtral-style folders go to the expert pager."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but torch sees no CUDA device")
    if _is_moe(args.model):
        try:
            moe = importlib.import_module("jobs.paging.moe")  # lazily: only MoE folders need it
        except ModuleNotFoundError as exc:
            if exc.name != "jobs.paging.moe":
                raise
            raise UsageError("MoE folders need the expert pager (jobs/paging/moe.py)") from None
        # For MoE folders fast/auto mean 4-bit experts (auto: only when the folder has a variant).
        return moe.load_paged_moe(args.model, device=args.device, dtype=args.dtype,
                                  expert_cache_bytes=args.expert_cache_bytes, cache_policy=args.cache_policy,
                                  variant=args.variant)
    from jobs.paging.layer_stream import load_streamed

    return load_streamed(args.model, device=args.device, dtype=args.dtype, vram_budget_bytes=args.vram_budget,
                         ram_budget_bytes=args.ram_budget, prefetch=not args.no_prefetch,
                         variant=args.variant, keep_precise=args.keep_precise)


def main(argv: list[str] | None = None) -> int:
    from jobs.errors import BudgetError, ModelFolderError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    try:
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise UsageError("--max-new-tokens and --batch-size must be >= 1")
        if args.kv_residual < 1:
            raise UsageError("--kv-residual must be >= 1 token")
        prompts = _read_prompts(args)
        sampling = _sampling(args)
        loaded = load_for_cli(args)
    except (UsageError, BudgetError, ModelFolderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = generate(loaded, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          sampling=sampling, stop=args.stop, kv_cache=args.kv_cache,
                          kv_residual=args.kv_residual)
        stats = {**loaded.stats(), "tokens_generated": result.tokens_generated, "wall_s": result.wall_s,
                 "prefill_s": result.prefill_s, "decode_s": result.decode_s,
                 "prompt_tokens": result.prompt_tokens, "weight_passes": result.weight_passes,
                 "kv_cache": result.kv_cache, "kv_cache_peak_bytes": result.kv_cache_peak_bytes}
    finally:
        close = getattr(loaded, "close", None)
        if close is not None:
            close()
    if args.json:
        print(json.dumps({"outputs": [asdict(o) for o in result.outputs], "stats": stats}))
    else:
        for out in result.outputs:
            print(f"{out.prompt}{out.text}\n---")
        print(f"{result.tokens_generated} tokens in {result.wall_s:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
