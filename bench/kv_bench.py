"""KV-cache quantization benchmark: bytes held per context length, context that fits a budget, decode tok/s.

Prints tables and writes bench/results/kv_<host>_<date>.json; never asserts timings.
Run: venvs/experimental/bin/python bench/kv_bench.py [--quick] [--budget 1GiB]

Gemma-3-270M figures are measured: transformers' cache objects (built by jobs.paging.kv_cache) are fed K/V
tensors of the model's shapes (a prefill of N-1 tokens, then one decode step) and kv_cache_nbytes() reads
what they hold; one real generate() per kind cross-checks them and times decoding. Mixtral-8x7B and
Gemma-3-27B rows are arithmetic from their public configs, using the per-value costs measured here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from machine import machine, write_results  # noqa: E402
from transformers import AutoConfig, DynamicCache  # noqa: E402

from jobs.contract.units import format_size, parse_size  # noqa: E402
from jobs.paging.convert import DEFAULT_OUT_DIR as GEMMA  # noqa: E402
from jobs.paging.dense.layer_stream import load_streamed  # noqa: E402
from jobs.paging.dtypes import TORCH_DTYPES  # noqa: E402
from jobs.paging.generate import generate  # noqa: E402
from jobs.paging.kv_cache import DEFAULT_RESIDUAL_TOKENS, kv_cache_nbytes, make_cache  # noqa: E402
from jobs.paging.open import spec_for  # noqa: E402

KINDS = [("fp", torch.float32), ("fp", torch.bfloat16), ("int8", torch.float32), ("int8", torch.bfloat16),
         ("fp8", torch.float32), ("fp8", torch.bfloat16)]
DTYPE_NAME = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# Public configs (config.json on the Hugging Face hub): layers, kv heads, head_dim, sliding window, full layers.
ANALYTIC = {
    "Mixtral-8x7B": dict(layers=32, kv_heads=8, head_dim=128, window=None, full_layers=32),
    "Gemma-3-27B": dict(layers=62, kv_heads=16, head_dim=128, window=1024, full_layers=10),  # 5 sliding : 1 full
}


def measured_bytes(config, kind: str, dtype: torch.dtype, context: int) -> int:
    """Bytes the cache holds after a prefill of context-1 tokens and one decode step, batch 1."""
    cache = make_cache(config, kind) or DynamicCache(config=config)
    shape = (1, config.num_key_value_heads, context - 1, config.head_dim)
    gen = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        for tokens in (context - 1, 1):
            k = torch.randn(shape[:2] + (tokens, shape[3]), generator=gen).to(dtype)
            v = torch.randn(shape[:2] + (tokens, shape[3]), generator=gen).to(dtype)
            cache.update(k, v, layer)
    return kv_cache_nbytes(cache)


def fit_line(points: dict[int, int]) -> tuple[float, float]:
    """(bytes per token, fixed bytes) through the two longest contexts: past every window, growth is linear."""
    (n1, b1), (n2, b2) = sorted(points.items())[-2:]
    slope = (b2 - b1) / (n2 - n1)
    return slope, b1 - slope * n1


def analytic_bytes(model: dict, context: int, value_bytes: float, element: int) -> float:
    """Full-attention layers store every token at value_bytes per value; sliding ones keep the window in fp."""
    per_layer_token = 2 * model["kv_heads"] * model["head_dim"]
    sliding_layers = model["layers"] - model["full_layers"]
    window = min(context, model["window"] or 0)
    return per_layer_token * (model["full_layers"] * context * value_bytes + sliding_layers * window * element)


def decode_speed(kinds: list[str], context: int, new_tokens: int, rounds: int) -> dict[str, dict]:
    """Real generate() on Gemma-3-270M (fp32, CPU), batch 1, a prompt of `context` tokens.

    Kinds are interleaved round by round, so a neighbour's load on a shared machine hits all of them.
    """
    out: dict[str, dict] = {kind: {"decode_tok_s": []} for kind in kinds}
    with load_streamed(spec_for(GEMMA, dtype="fp32")) as loaded:
        words = " ".join(f"item{i} is placed next to item{i + 1}." for i in range(context))
        ids = loaded.tokenizer(words)["input_ids"][1:context]  # the tokenizer adds <bos> again
        prompt = loaded.tokenizer.decode(ids)
        for round_index in range(rounds):
            for kind in kinds:
                result = generate(loaded, [prompt], max_new_tokens=new_tokens, kv_cache=kind)
                steps = result.weight_passes - 1
                out[kind]["decode_tok_s"].append(steps / result.decode_s)
                out[kind].update(prompt_tokens=result.prompt_tokens, decode_steps=steps,
                                 peak_cache_bytes=result.kv_cache_peak_bytes,
                                 first_tokens=result.outputs[0].token_ids[:8])
                print(f"  round {round_index + 1} {kind:4s}: {steps / result.decode_s:.2f} tok/s over {steps} "
                      f"steps, prefill {result.prefill_s:.1f} s, peak cache "
                      f"{format_size(result.kv_cache_peak_bytes)}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter contexts and fewer decode steps")
    p.add_argument("--budget", default="1GiB", help="KV budget for the max-context column")
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="decode runs per kind, interleaved")
    args = p.parse_args()
    budget = parse_size(args.budget)
    contexts = [512, 2048, 8192] if args.quick else [512, 2048, 8192, 32768]
    config = AutoConfig.from_pretrained(GEMMA).get_text_config(decoder=True)
    info = machine()
    info["loadavg_start"] = list(os.getloadavg())
    print(f"machine: {info['cpu']} x{info['cores']}, load {info['loadavg_start']}")

    rows = []
    print(f"\nGemma-3-270M, measured cache bytes (batch 1, int8 residual {DEFAULT_RESIDUAL_TOKENS} tokens)")
    print(f"{'kind':10s}" + "".join(f"{n:>12d}" for n in contexts) + f"{'B/token':>10s}{'max ctx @ ' + args.budget:>16s}")
    for kind, dtype in KINDS:
        points = {n: measured_bytes(config, kind, dtype, n) for n in contexts}
        slope, fixed = fit_line(points)
        max_context = int((budget - fixed) // slope)
        name = f"{kind}-{DTYPE_NAME[dtype]}"
        rows.append({"model": "Gemma-3-270M", "kind": name, "bytes": points, "bytes_per_token": slope,
                     "fixed_bytes": fixed, "max_context": max_context, "source": "measured"})
        print(f"{name:10s}" + "".join(f"{format_size(points[n]):>12s}" for n in contexts)
              + f"{slope:>10.0f}{max_context:>16d}")

    # Per-value cost of full-attention storage, measured above on Gemma's full layers: reused for the arithmetic.
    full_values = 2 * config.num_key_value_heads * config.head_dim * sum(
        t == "full_attention" for t in config.layer_types)
    value_cost = {r["kind"]: r["bytes_per_token"] / full_values for r in rows}
    print("\nmeasured bytes per full-attention value: "
          + ", ".join(f"{k} {v:.4f}" for k, v in value_cost.items()))
    analytic_contexts = [8192, 32768, 131072]
    print("\nARITHMETIC, not measured: bf16 models at batch 1, bytes per value from the line above")
    print(f"{'model':14s}{'kind':10s}" + "".join(f"{n:>12d}" for n in analytic_contexts)
          + f"{'max ctx @ ' + args.budget:>16s}")
    for model_name, model in ANALYTIC.items():
        for kind in ("fp-bf16", "int8-bf16", "fp8-bf16"):
            sizes = {n: analytic_bytes(model, n, value_cost[kind], 2) for n in analytic_contexts}
            per_token = 2 * model["kv_heads"] * model["head_dim"] * model["full_layers"] * value_cost[kind]
            fixed = analytic_bytes(model, model["window"] or 0, 0, 2) if model["window"] else 0
            max_context = int((budget - fixed) // per_token) if budget > fixed else 0
            rows.append({"model": model_name, "kind": kind, "bytes": sizes, "bytes_per_token": per_token,
                         "fixed_bytes": fixed, "max_context": max_context, "source": "arithmetic"})
            print(f"{model_name:14s}{kind:10s}" + "".join(f"{format_size(int(sizes[n])):>12s}"
                                                          for n in analytic_contexts) + f"{max_context:>16d}")

    context, new_tokens = (256, 8) if args.quick else (args.decode_context, args.new_tokens)
    print(f"\nGemma-3-270M fp32 on CPU, decode at a {context}-token prompt, {new_tokens} new tokens, batch 1")
    speed = decode_speed(["fp", "int8", "fp8"], context, new_tokens, 1 if args.quick else args.rounds)
    info["loadavg_end"] = list(os.getloadavg())
    path = write_results("kv", {"budget_bytes": budget, "contexts": contexts, "rows": rows,
                                "decode": {"context": context, "new_tokens": new_tokens, "by_kind": speed},
                                "torch": torch.__version__, "loadavg": [info["loadavg_start"], info["loadavg_end"]],
                                "ran_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
