"""GGUF benchmark: the embedded Gemma-3-270M Q4_K_M streamed from its GGUF file vs its converted bf16 folder
streamed vs the GGUF with every layer resident (the plan then keeps layers and head expanded) vs transformers
resident (fp32 load of the same GGUF), and llama.cpp's Python binding as the peer.

Prints a table and writes bench/results/gguf_<host>_<date>.json; never asserts timings. Bytes per pass are
what one forward pass reads for its decoder layers (every layer streamed, no RAM cache).
Run: venvs/experimental/bin/python bench/gguf_bench.py [--batches 1,4,16] [--llama-python /tmp/llama/bin/python]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from machine import machine, write_results  # noqa: E402
from stream_bench import BASE_PROMPTS, Resident, run_case  # noqa: E402

from jobs.paging.convert import DEFAULT_OUT_DIR, convert_default, import_gguf  # noqa: E402
from jobs.paging.dense.layer_stream import load_streamed  # noqa: E402
from jobs.paging.generate import generate  # noqa: E402
from jobs.paging.open import spec_for  # noqa: E402
from jobs.paging.plan.shape import shape_from_path  # noqa: E402

MiB = 1 << 20
# Two fp32 layer slots (21.3 MiB each) and nothing resident: every pass streams all 18 layers.


def streamed_budget(path: Path) -> int:
    """Room for two slots and a half of the model's layer as it crosses (blocks for a GGUF, fp32 for a
    folder): the plan then keeps no layer resident, so every layer is read on every pass."""
    shape = shape_from_path(path)
    return 2 * shape.layer_stored_bytes + shape.layer_stored_bytes // 2 if shape.gguf \
        else 5 * shape.layer_numel * 4 // 2

# llama.cpp's binding at batch 1: its own greedy loop over the same file, CPU only, threads = cores.
LLAMA_SCRIPT = r"""
import json, sys, time, os
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=os.cpu_count(), n_gpu_layers=0, verbose=False)
prompt, new = sys.argv[2], int(sys.argv[3])
llm(prompt, max_tokens=2, temperature=0.0)  # warm-up
start = time.perf_counter()
out = llm(prompt, max_tokens=new, temperature=0.0)
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "tokens": out["usage"]["completion_tokens"],
                  "prompt_tokens": out["usage"]["prompt_tokens"]}))
"""


def bench(loaded, batches: list[int], new_tokens: int, rounds: int) -> list[dict]:
    generate(loaded, BASE_PROMPTS[:1], max_new_tokens=2)  # warm-up: page cache, allocator
    rows = []
    for batch in batches:
        prompts = [BASE_PROMPTS[i % len(BASE_PROMPTS)] + f" ({i})" for i in range(batch)]
        best = None
        for _ in range(rounds):
            row = run_case(loaded, prompts, new_tokens)
            if best is None or row["wall_s"] < best["wall_s"]:
                best = row
        best["tok_s"] = best["tokens_generated"] / best["wall_s"]
        rows.append(best)
        print(f"  batch {batch:>2}: {best['tok_s']:7.2f} tok/s (decode {best['decode_tok_s']:.2f}), "
              f"wall {best['wall_s']:.2f} s", flush=True)
    return rows


def llama_cpp_row(python: str, gguf: Path, new_tokens: int) -> dict:
    proc = subprocess.run([python, "-c", LLAMA_SCRIPT, str(gguf), BASE_PROMPTS[0], str(new_tokens)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"batch": 1, **out, "tok_s": out["tokens"] / out["wall_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--llama-python", help="a python with llama-cpp-python installed (the peer row)")
    parser.add_argument("--llama-status", default="not run", help="what to record when there is no peer row")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    gguf, folder = import_gguf(), convert_default(DEFAULT_OUT_DIR)
    settings = dict(device="cpu", dtype="fp32", ram_budget_bytes=None,
                    context_tokens=256)
    methods = {}
    # The last case gives no layer budget: every layer resident, so the plan keeps the layers and the head
    # expanded (nothing streams); bytes per pass are then 0.
    for name, path, budget in (("gguf streamed", gguf, streamed_budget(gguf)),
                               ("bf16 folder streamed", folder, streamed_budget(folder)),
                               ("gguf resident, expanded by the plan", gguf, None)):
        print(f"{name}: {path}", flush=True)
        with load_streamed(spec_for(path, **{**settings, "vram_budget_bytes": budget}),
                           batch_size=max(batches)) as loaded:
            rows = bench(loaded, batches, args.new_tokens, args.rounds)
            stats = loaded.stats()
        methods[name] = {"path": str(path), "bytes_per_pass": stats["bytes_read_per_pass"], "rows": rows,
                         "vram_budget_bytes": budget, "resident_layers": stats["resident_layers"],
                         "expanded_layers": stats["expanded_layers"], "expanded_head": stats["expanded_head"]}
    print("resident transformers (fp32 load of the GGUF)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_s = time.perf_counter() - start
    methods["resident transformers"] = {"path": str(gguf), "bytes_per_pass": 0, "load_s": load_s,
                                        "rows": bench(Resident(model, tokenizer), batches, args.new_tokens,
                                                      args.rounds)}
    del model
    peer = llama_cpp_row(args.llama_python, gguf, args.new_tokens) if args.llama_python else {"status":
                                                                                           args.llama_status}
    print(f"\n{'method':<36} {'MiB/pass':>9} " + " ".join(f"{'b' + str(b) + ' tok/s':>11}" for b in batches))
    for name, m in methods.items():
        cells = " ".join(f"{r['tok_s']:>11.2f}" for r in m["rows"])
        print(f"{name:<36} {m['bytes_per_pass'] / MiB:>9.1f} {cells}")
    if "tok_s" in peer:
        print(f"{'llama-cpp-python':<24} {'-':>9} {peer['tok_s']:>11.2f}  (batch 1 only)")
    else:
        print(f"llama-cpp-python: {peer.get('status') or peer.get('error')}")
    path = write_results("gguf", {"batches": batches, "new_tokens": args.new_tokens, "methods": methods,
                                  "llama_cpp": peer, "machine_note": machine()["cpu"]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
