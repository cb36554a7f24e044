"""The `probe` kind: what the worker environment has (python, torch, CUDA, disk) and how fast it
reads model bytes (sequential read bandwidth, page cache dropped where the OS allows)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from jobs.contract.confine import Roots
from jobs.paging.plan.disk import remember_read_bandwidth

CHUNK_BYTES = 8 * 1024**2
MIB = 1024**2                # progress is reported in MiB read, not raw bytes


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False, "why": "torch is not installed in this interpreter"}
    if not torch.cuda.is_available():
        return {"available": False, "why": "torch reports no CUDA device"}
    devices = []
    for i in range(torch.cuda.device_count()):
        free_b, total_b = torch.cuda.mem_get_info(i)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i),
                        "memory_total_bytes": total_b, "memory_free_bytes": free_b})
    return {"available": True, "cuda_version": torch.version.cuda, "devices": devices}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [p for p in path.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _drop_cache(fd: int) -> bool:
    """Ask the kernel to forget this file's pages, so the read is a disk read (best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False


def measure_read_bandwidth(path: Path, limit_bytes: int, progress=None,
                           roots: Roots | None = None) -> dict[str, Any]:
    """With `roots`, files that resolve outside the allowed roots are skipped (a warning each),
    and each file is checked again once opened (a link swapped in after the listing fails)."""
    files = roots.keep(_files(path)) if roots else _files(path)
    want = min(limit_bytes, sum(f.stat().st_size for f in files))   # what progress counts to
    total, dropped, start = 0, True, time.perf_counter()
    buf = bytearray(CHUNK_BYTES)
    for f in files:
        with (roots.open(f) if roots else open(f, "rb", buffering=0)) as fh:
            dropped &= _drop_cache(fh.fileno())
            while total < limit_bytes:
                n = fh.readinto(buf)
                if not n:
                    break
                total += n
                if progress:
                    progress(total, want)
        if total >= limit_bytes:
            break
    elapsed = time.perf_counter() - start
    return {"path": str(path), "files": len(files), "bytes_read": total, "seconds": elapsed,
            "bytes_per_s": total / elapsed if elapsed > 0 else None,
            "page_cache_dropped": dropped}


def run(params: dict[str, Any], ctx) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": _version("torch"), "transformers": _version("transformers"),
        "safetensors": _version("safetensors"), "cuda": _cuda(),
    }
    usage = shutil.disk_usage(ctx.state_dir if ctx.state_dir.exists() else ctx.output_dir)
    info["disk"] = {"path": str(ctx.state_dir), "free_bytes": usage.free, "total_bytes": usage.total}
    target = ctx.roots.param("path", params["path"]) if params.get("path") else ctx.models_dir
    limit = params["read_limit_bytes"]  # defaulted by jobs.contract.kinds.validate_params
    if target.exists() and _files(target):
        info["read_bandwidth"] = measure_read_bandwidth(
            target, limit, progress=lambda d, t: ctx.progress(d // MIB, max(1, -(-t // MIB)),
                                                              "MiB"),
            roots=ctx.roots if params.get("path") else None)
        ctx.metric(read_bytes_per_s=info["read_bandwidth"]["bytes_per_s"])
        # the memory plan's disk bound uses it for models on this disk (jobs.paging.plan.disk)
        info["read_bandwidth"]["remembered"] = remember_read_bandwidth(ctx.state_dir, info["read_bandwidth"])
    else:
        info["read_bandwidth"] = {"path": str(target), "bytes_per_s": None,
                                  "why": "nothing to read there; pass -p path=FILE_OR_DIR"}
    path = ctx.write_json("probe.json", info)
    ctx.log.info("probe done: torch %s, cuda %s", info["torch"], info["cuda"]["available"])
    return {"result_path": str(path), **info}
