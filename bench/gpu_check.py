"""The one prepared GPU check (scripts/gpu-check.sh runs it): everything this project can only learn on a
CUDA card, in one JSON report, in under 8 minutes on one GPU.

Steps (each timed; a failing step is recorded and the next one runs):
  pcie      pinned host -> device bandwidth, 1 GiB copies (the bound every streamed byte pays)
  stream27  a Gemma-3-27B-shaped model (random bf16 weights, --layers of its 62) streamed in fp16 under an
            emulated RTX 2080 Ti: torch.cuda.set_per_process_memory_fraction caps the allocator at the card's
            10.76 GiB less its CUDA context, device_memory_bytes tells the plan the same; max_memory_allocated()
            against the plan's peak, the streamer's H2D bytes/s against the pcie figure
  moe       a Mixtral-8x7B-shaped folder (--moe-layers of its 32) paged under the same cap with ram_budget_bytes
            below its experts: exact pinned bytes, logits finite, peak vs plan
  oom       a provoked CUDA OOM under the cap: jobs.contract.oom names it "cuda" with the allocator's numbers
  nvml      real readings through lab_attendant.guards.host.NvmlSensors (in the supervisor's venv)
Run pytest tests/gpu with TORCH_CUDA_SANITIZER=1 first (scripts/gpu-check.sh does).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine, write_results  # noqa: E402

GiB = 1024**3
CARD_BYTES = int(10.76 * GiB)      # what an RTX 2080 Ti gives CUDA
CONTEXT_BYTES = 400 * 1024**2      # its CUDA context (memplan's rtx2080ti profile)
EMULATED = CARD_BYTES - CONTEXT_BYTES


def cap_device() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(EMULATED / total, 0)


def step_pcie() -> dict:
    src = torch.empty(GiB, dtype=torch.uint8).pin_memory()
    dst = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del src, dst
    torch.cuda.empty_cache()
    return {"h2d_bytes_per_s": 5 * GiB / seconds}


def step_stream27(work: Path, layers: int, pcie: float | None) -> dict:
    from stream_bench import build_synthetic_27b

    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.generate import generate
    from jobs.paging.open import spec_for

    folder = build_synthetic_27b(work / "gemma27-shape", layers, ROOT / "models" / "gemma-3-270m")
    layer_bytes = 825_797_120
    torch.cuda.reset_peak_memory_stats()
    spec = spec_for(folder, device="cuda", dtype="fp16", fp16_safe="on", context_tokens=2048,
                    device_memory_bytes=EMULATED, vram_budget_bytes=3 * layer_bytes, ram_budget_bytes=2 * layer_bytes)
    with load_streamed(spec, batch_size=1) as sm:
        plan = sm.plan
        result = generate(sm, ["The history of the printing press"], max_new_tokens=8, batch_size=1)
        stats = sm.stats()
    peak = torch.cuda.max_memory_allocated()
    h2d_s = stats["io_wait_s"] + stats["compute_s"]
    return {"layers": layers, "plan_peak_device_bytes": plan.peak_device_bytes, "max_memory_allocated": peak,
            "within_plan": peak <= plan.peak_device_bytes, "plan_pinned_bytes": plan.peak_pinned_bytes,
            "pinned_bytes": stats["pinned_bytes"], "max_slots_in_use": stats["max_slots_in_use"],
            "streaming_slots": stats["streaming_slots"], "bytes_h2d": stats["bytes_h2d"],
            "h2d_bytes_per_s_achieved": stats["bytes_h2d"] / h2d_s if h2d_s else None,
            "pcie_bytes_per_s": pcie, "tokens": result.tokens_generated, "wall_s": result.wall_s,
            "io_wait_s": stats["io_wait_s"], "compute_s": stats["compute_s"]}


def step_moe(work: Path, layers: int) -> dict:
    from moe_bench import CONFIGS, write_random_model

    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    shape = {**CONFIGS["mixtral-8x7b"], "num_hidden_layers": layers}
    folder = write_random_model(work / "mixtral-shape", shape, torch.bfloat16)
    expert_bytes = 3 * 4096 * 14336 * 2
    budget = (layers * 8 // 2 + 2) * expert_bytes      # half the experts in RAM, plus the staging ring
    torch.cuda.reset_peak_memory_stats()
    with load_paged_moe(spec_for(folder, device="cuda", dtype="fp16", ram_budget_bytes=budget,
                                 expert_cache_bytes=6 * expert_bytes)) as moe:
        ids = torch.randint(0, 32000, (1, 64), device="cuda")
        logits = moe.model(input_ids=ids).logits
        stats = moe.stats()
    return {"layers": layers, "ram_budget_bytes": budget, "host_pinned_bytes": stats.get("host_pinned_bytes"),
            "pinned_within_budget": (stats.get("host_pinned_bytes") or 0) <= budget,
            "experts_from_disk": stats.get("experts_from_disk"), "logits_finite": bool(torch.isfinite(logits).all()),
            "max_memory_allocated": torch.cuda.max_memory_allocated(), "hits": stats["hits"],
            "misses": stats["misses"]}


def step_oom() -> dict:
    from jobs.contract.oom import oom_details, oom_kind

    try:
        torch.empty(2 * CARD_BYTES, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as exc:
        return {"oom_kind": oom_kind(exc), **oom_details(exc)}
    return {"oom_kind": None, "error": "no OOM under the emulated cap"}


def step_nvml() -> dict:
    python = ROOT / ".venv" / "bin" / "python"
    code = ("import json; from lab_attendant.guards.host import NvmlSensors; s = NvmlSensors(); "
            "import dataclasses; print(json.dumps([dataclasses.asdict(r) for r in s.read()], default=str))")
    proc = subprocess.run([str(python if python.exists() else sys.executable), "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        return {"error": proc.stderr.strip()[-500:]}
    return {"readings": json.loads(proc.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="27B-shaped layers to write (826 MB each)")
    parser.add_argument("--moe-layers", type=int, default=4, help="Mixtral-shaped layers (2.8 GB each)")
    parser.add_argument("--out", type=Path, help="report path (default: bench/results/gpu_check-<host>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    report: dict = {"machine": machine(), "emulated_device_bytes": EMULATED, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        steps = [("pcie", step_pcie), ("nvml", step_nvml)]
        for name, fn in steps:
            report["steps"][name] = _timed(fn)
        cap_device()
        pcie = report["steps"]["pcie"].get("h2d_bytes_per_s")
        report["steps"]["stream27"] = _timed(lambda: step_stream27(work, args.layers, pcie))
        torch.cuda.empty_cache()
        report["steps"]["moe"] = _timed(lambda: step_moe(work, args.moe_layers))
        torch.cuda.empty_cache()
        report["steps"]["oom"] = _timed(step_oom)
    if args.out is None:
        path = write_results("gpu_check", json.loads(json.dumps(report, default=str)))
    else:
        path = args.out
        path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["steps"], indent=2, default=str))
    print(f"report: {path}", file=sys.stderr)
    return 0 if all("error" not in s for s in report["steps"].values()) else 1


def _timed(fn) -> dict:
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - a failed step is a finding; the report carries it
        out = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
