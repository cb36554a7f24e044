"""Memory plan vs measured: what memplan says a run takes, against the peak the run really reached.

CPU (this bench's default): the real Gemma-3-270M (fp32) streamed or resident at several batch x context
sizes, each in a fresh subprocess; measured = peak anonymous RSS (RssAnon, sampled every 2 ms; the
checkpoint's mmapped pages are page cache, not the run's) less its value after torch and transformers were
imported, so it holds what the plan counts (weights, KV cache, activations) plus the tokenizer, the
allocator's and Python's overheads, and the load's transient copies. On CUDA (--device cuda) measured = torch.cuda.max_memory_allocated().
The plan's own figures for Gemma-3-27B and Mixtral-8x7B on the 2080 Ti profile are printed beside (no
measurement: that needs the card, see scripts/gpu-check.sh).

  venvs/experimental/bin/python bench/plan_bench.py [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import write_results  # noqa: E402

from jobs.contract.units import format_size  # noqa: E402
from jobs.paging.plan.memplan import PlanRequest, make_plan  # noqa: E402
from jobs.paging.plan.profiles import profile  # noqa: E402
from jobs.paging.plan.shape import shape_from_folder  # noqa: E402

MODEL = ROOT / "models" / "gemma-3-270m"
CASES = [  # (label, batch, context, vram_budget_layers): None = the plan's choice (all resident here)
    ("resident", 1, 512, None), ("resident", 4, 512, None), ("resident", 8, 1024, None),
    ("streamed 2+2", 1, 512, 4), ("streamed 2+2", 8, 1024, 4),
]
NEW_TOKENS = 8

CHILD = r"""
import json, sys, threading, time, torch
from jobs.paging.dense.layer_stream import load_streamed
from jobs.paging.generate import generate
from jobs.paging.open import spec_for
from jobs.paging.dense.model_store import ModelStore
args = json.loads(sys.argv[1])
def anon():  # anonymous resident memory: what the run allocated, not the checkpoint's mmapped pages
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
torch.set_num_threads(2)
base = anon()
threading.Thread(target=sample, daemon=True).start()
cuda = args["device"] == "cuda"
layer = max(ModelStore(args["model"]).layer_nbytes_as(torch.float32 if not cuda else torch.float16))
budget = None if args["layers"] is None else args["layers"] * layer
with load_streamed(spec_for(args["model"], device=args["device"], dtype="fp32" if not cuda else "fp16",
                            context_tokens=args["context"], vram_budget_bytes=budget), batch_size=args["batch"]) as sm:
    tok = sm.tokenizer
    ids = tok("the quiet river " * args["context"], add_special_tokens=False)["input_ids"]
    prompt = tok.decode(ids[: args["context"] - args["new"] - 2])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    generate(sm, [prompt] * args["batch"], max_new_tokens=args["new"], batch_size=args["batch"])
    plan = sm.plan
    peak = torch.cuda.max_memory_allocated() if cuda else max(peak[0], anon()) - base
    print(json.dumps({"plan_peak": plan.peak_device_bytes, "measured_peak": peak, "resident": plan.resident_layers,
                      "slots": plan.streaming_slots, "rows": plan.rows}))
"""


def run_case(device: str, batch: int, context: int, layers: int | None) -> dict:
    arg = json.dumps({"model": str(MODEL), "device": device, "batch": batch, "context": context, "layers": layers,
                      "new": NEW_TOKENS})
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    rows = []
    print(f"{'case':<14} {'batch x ctx':>12} {'plan':>10} {'measured':>10} {'measured/plan':>14}")
    for label, batch, context, layers in CASES:
        out = run_case(args.device, batch, context, layers)
        row = {"case": label, "batch": batch, "context": context, **out}
        rows.append(row)
        if "error" in out:
            print(f"{label:<14} {batch:>4} x {context:<6} error: {out['error']}")
            continue
        ratio = out["measured_peak"] / out["plan_peak"]
        row["measured_over_plan"] = ratio
        print(f"{label:<14} {batch:>4} x {context:<6} {format_size(out['plan_peak']):>10} "
              f"{format_size(out['measured_peak']):>10} {ratio:>14.2f}")
    card = profile("rtx2080ti", host_ram_bytes=30 * 1024**3)
    plans = {}
    for name, folder, request in (
            ("gemma-3-27b 1x2048", "gemma-3-27b-it", PlanRequest(batch=1, context=2048, fp16_safe=True)),
            ("gemma-3-27b 8x1024", "gemma-3-27b-it", PlanRequest(batch=8, context=1024, fp16_safe=True)),
            ("mixtral-8x7b 1x2048 ram 8GiB", "mixtral-8x7b-v0.1",
             PlanRequest(batch=1, context=2048, ram_budget_bytes=8 * 1024**3))):
        plan = make_plan(shape_from_folder(ROOT / "examples" / "configs" / folder), card, request, folder)
        plans[name] = {k: plan.to_json()[k] for k in ("fits", "reason", "peak_device_bytes", "peak_pinned_bytes",
                                                       "bytes_per_pass", "bound_tokens_per_s", "resident_layers",
                                                       "streaming_slots", "expert_cache_slots", "experts_in_ram")}
        print(f"plan only, rtx2080ti: {name}: peak {format_size(plan.peak_device_bytes)}, pinned "
              f"{format_size(plan.peak_pinned_bytes)}, bound {plan.bound_tokens_per_s or 0:.3g} tok/s")
    path = write_results("plan_bench", {"device": args.device, "cases": rows, "plans_rtx2080ti": plans})
    print(f"results: {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
