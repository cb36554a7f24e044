"""The memory plan for the 4-bit GGUFs people hold, on the 2080 Ti profile, from their headers alone:
Gemma-3-27B Q4_0 (Google's QAT release) and Q4_K_M (Ollama's gemma3:27b), Mixtral-8x7B Q4_K_M, beside
the fp16 Gemma-3-27B folder. Each file is written header-only (its real metadata and tensor table, the data
a sparse hole: tests/fixtures/gguf_headers.py) and planned by jobs.paging.plan as `model plan` does; the
bound is given twice: with every byte per pass in host RAM, and with what a 16 GiB host cannot keep read
from a 2 GB/s disk. Arithmetic, not a measurement: it runs anywhere, without torch.

  .venv/bin/python bench/gguf_plan_bench.py [--host-ram 16GiB] [--disk-bandwidth 2GB]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import write_results  # noqa: E402

from jobs.contract.units import format_size, parse_size  # noqa: E402
from jobs.paging.plan.faster import faster_options  # noqa: E402
from jobs.paging.plan.memplan import PlanRequest, make_plan  # noqa: E402
from jobs.paging.plan.profiles import fp16_safe_for, profile  # noqa: E402
from jobs.paging.plan.shape import shape_from_path  # noqa: E402
from tests.fixtures.gguf_headers import gemma3_27b, mixtral_8x7b_q4_k_m, write_header_only  # noqa: E402

CASES = [(1, 1024), (8, 1024), (8, 2048)]


def _fmt_bound(v: float | None) -> str:
    return f"{v:.3g}" if v else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-ram", type=parse_size, default=16 * 1024**3)
    parser.add_argument("--disk-bandwidth", type=parse_size, default=2 * 10**9)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-plan-") as tmp:
        models = {}
        for label, (meta, tensors) in (("gemma-3-27b-it Q4_0", gemma3_27b("Q4_0")),
                                       ("gemma-3-27b-it Q4_K_M", gemma3_27b("Q4_K_M")),
                                       ("mixtral-8x7b Q4_K_M", mixtral_8x7b_q4_k_m())):
            path = Path(tmp) / (label.replace(" ", "-") + ".gguf")
            write_header_only(path, meta, tensors)
            models[label] = (path, path.stat().st_size)
        models["gemma-3-27b-it bf16 folder"] = (ROOT / "examples/configs/gemma-3-27b-it", None)
        device = profile("rtx2080ti", host_ram_bytes=args.host_ram)
        for label, (path, file_bytes) in models.items():
            shape = shape_from_path(path)
            for batch, context in CASES:
                req = PlanRequest(batch=batch, context=context, dtype="fp16",
                                  fp16_safe=fp16_safe_for("auto", "fp16", shape.model_type),
                                  disk_bytes_per_s=float(args.disk_bandwidth), disk_source="assumed")
                plan = make_plan(shape, device, req, label)
                four_bit = next((f for f in faster_options(shape, device, req, plan)
                                 if f["what"].startswith("a 4-bit")), None)
                rows.append({"model": label, "format": shape.weights_format, "file_bytes": file_bytes,
                             "batch": batch, "context": context, "fits": plan.fits,
                             "peak_device_bytes": plan.peak_device_bytes, "resident_layers": plan.resident_layers,
                             "expert_cache_slots": plan.expert_cache_slots,
                             "bytes_per_pass": plan.bytes_per_pass, "disk_bytes_per_pass": plan.disk_bytes_per_pass,
                             "from_disk": plan.from_disk,
                             "bound_from_ram_tokens_per_s": plan.bound_from_ram_tokens_per_s,
                             "bound_from_disk_tokens_per_s": plan.bound_from_disk_tokens_per_s,
                             "bound_tokens_per_s": plan.bound_tokens_per_s,
                             "bytes_by_block_type": plan.bytes_by_block_type,
                             "four_bit_bound_tokens_per_s": four_bit and four_bit["bound_tokens_per_s"],
                             "reason": plan.reason})
    disk_gb = args.disk_bandwidth / 1e9
    print(f"2080 Ti profile, fp16 compute, {format_size(args.host_ram)} host RAM, {disk_gb:.3g} GB/s disk\n")
    print(f"{'model':<27} {'batch x ctx':>11} {'fits':>4} {'peak':>9} {'per pass':>9} {'from disk':>9} "
          f"{'tok/s RAM':>9} {'tok/s disk':>10} {'bound':>7}")
    for r in rows:
        print(f"{r['model']:<27} {r['batch']:>4} x {r['context']:<4} {'yes' if r['fits'] else 'no':>4} "
              f"{format_size(r['peak_device_bytes']):>9} {format_size(r['bytes_per_pass']):>9} "
              f"{'yes' if r['from_disk'] else 'no':>9} {_fmt_bound(r['bound_from_ram_tokens_per_s']):>9} "
              f"{_fmt_bound(r['bound_from_disk_tokens_per_s']):>10} {_fmt_bound(r['bound_tokens_per_s']):>7}")
    path = write_results("gguf_plan", {"device_profile": "rtx2080ti", "host_ram_bytes": args.host_ram,
                                       "disk_bytes_per_s": args.disk_bandwidth, "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
