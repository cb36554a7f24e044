"""The one prepared GPU check (scripts/gpu-check.sh runs it): everything this project can only learn on a
CUDA card, in one JSON report rewritten after every step, in under 8 minutes on one GPU; `--rehearse` runs
every step on the CPU so the first GPU hour is not spent on a broken script.

Owns the steps, the RTX 2080 Ti emulation and the report. Nothing is read from models/ (a bare GPU machine has
none): the weights are random, written from the real configs' shapes (Gemma-3-27B, Mixtral-8x7B; generated on
the device), with a word-level tokenizer written beside them. Emulation on CUDA: the allocator capped at the
card's 10.76 GiB less its context (set_per_process_memory_fraction) and the plan told the same, flash and cuDNN
SDPA off, fp16, and a dispatch guard that records every op computing in bf16 (a 2080 Ti has none; converting
stored bf16 weights is not compute and passes).

Steps (independent: a failing one is recorded and the next runs):
  env       torch / CUDA / capability, the emulation settings
  pcie      pinned (cudaHostRegister'ed arena) host -> device bandwidth
  stream27  27B-shaped layers streamed in fp16 under the cap; a ~2000-token prompt; plan vs max_memory_reserved
  moe       Mixtral-shaped experts paged under the cap with a RAM budget below the experts
  oom       a provoked CUDA OOM: jobs.contract.oom names it "cuda" with the allocator's numbers
  nvml      real readings through lab_attendant.guards.host.NvmlSensors
CUDA-only values in a rehearsal read NOT_MEASURED.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine  # noqa: E402

GiB = 1024**3
CARD_BYTES = int(10.76 * GiB)      # what an RTX 2080 Ti gives CUDA
CONTEXT_BYTES = 400 * 1024**2      # its CUDA context (memplan's rtx2080ti profile)
EMULATED = CARD_BYTES - CONTEXT_BYTES
NOT_MEASURED = "not measured: cpu rehearsal"
PROMPT_TOKENS = 2000
# The real configs' shapes (Gemma-3-27B text model, Mixtral-8x7B); `layers` of them are written.
GEMMA27 = dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_attention_heads=32,
               num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024)
MIXTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, num_local_experts=8)
# Rehearsal: the same families and layer types, every width divided so the CPU runs them in seconds.
REHEARSE = {"gemma": dict(vocab_size=4096, hidden_size=168, intermediate_size=672, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=42, query_pre_attn_scalar=42, sliding_window=64),
            "mixtral": dict(vocab_size=4096, hidden_size=128, intermediate_size=448, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=8)}
# Ops that move or reinterpret bf16 bytes without computing in bf16 (reading a stored bf16 weight into fp16).
_MOVES = {"_to_copy", "copy_", "view", "_unsafe_view", "slice", "detach", "alias", "t", "reshape",
          "as_strided", "empty_like", "clone", "split", "split_with_sizes", "lift_fresh", "select", "unbind",
          "narrow", "contiguous", "empty", "set_", "transpose", "permute", "unsqueeze", "squeeze", "expand",
          "_pin_memory", "is_pinned", "resize_", "new_empty", "empty_strided", "chunk", "index_select", "cat"}


class Bf16Guard(TorchDispatchMode):
    """Records every op (on this thread) that computes with a bf16 tensor: what a 2080 Ti would emulate."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _MOVES:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(t.dtype == torch.bfloat16 for t in tensors):
                self.ops[name] = self.ops.get(name, 0) + 1
        return out


class Check:
    """The run: device, emulation, and the report written to `out` after every step."""

    def __init__(self, out: Path, rehearse: bool, layers: int, moe_layers: int) -> None:
        self.out, self.rehearse = out, rehearse
        self.cuda = not rehearse
        self.device = "cuda" if self.cuda else "cpu"
        self.layers, self.moe_layers = layers, moe_layers
        self.report: dict[str, Any] = {"machine": machine(), "rehearsal": rehearse, "device": self.device,
                                       "emulated_device_bytes": EMULATED, "steps": {}}
        self.write()

    def measured(self, fn: Callable[[], Any]) -> Any:
        """A CUDA-only value: measured on the card, NOT_MEASURED in a rehearsal."""
        return fn() if self.cuda else NOT_MEASURED

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)

    def step(self, name: str, fn: Callable[[], dict]) -> None:
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is a finding; the report carries it
            out = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        out["seconds"] = round(time.perf_counter() - start, 2)
        self.report["steps"][name] = out
        self.write()
        print(f"gpu_check: {name}: {'error' if 'error' in out else 'ok'} ({out['seconds']} s)", file=sys.stderr,
              flush=True)


def emulate_2080ti(check: Check) -> dict:
    """Flash and cuDNN SDPA off everywhere (a 2080 Ti has neither); on CUDA the allocator capped."""
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    if check.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(EMULATED / total, 0)
    from jobs.paging.capability import sdpa_backends

    return {"sdpa_backends": sdpa_backends(check.device), "dtype": "fp16",
            "memory_fraction_cap_bytes": check.measured(lambda: EMULATED)}


def step_env(check: Check) -> dict:
    import transformers

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "device_name": check.measured(lambda: torch.cuda.get_device_name(0)),
            "capability": check.measured(lambda: list(torch.cuda.get_device_capability(0))),
            "emulation": emulate_2080ti(check)}


def step_pcie(check: Check) -> dict:
    """Host -> device through an arena page-locked with cudaHostRegister, as the engine's arenas are."""
    from jobs.paging.pinned import HostArena

    nbytes = GiB if check.cuda else 64 * 1024**2
    arena = HostArena(nbytes, pin=check.cuda, what="pcie check")
    try:
        src = arena.take(nbytes)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=check.device)
        dst.copy_(src, non_blocking=True)
        _sync(check)
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        _sync(check)
        seconds = time.perf_counter() - start
        return {"bytes": nbytes, "pinned_bytes": arena.pinned_bytes, "pin": arena.pin_reason,
                "h2d_bytes_per_s": check.measured(lambda: 5 * nbytes / seconds),
                "host_copy_bytes_per_s": None if check.cuda else 5 * nbytes / seconds}
    finally:
        arena.close()


def _sync(check: Check) -> None:
    if check.cuda:
        torch.cuda.synchronize()


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over "w3" .. "w{vocab-1}" (ids 0-2: pad, bos, eos): load_streamed reads one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            unk_token="<pad>").save_pretrained(folder)


def write_synthetic(folder: Path, config, device: str) -> Path:
    """Random bf16 weights of `config`'s shapes, generated on `device` (seconds on a GPU), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    write_tokenizer(folder, config.vocab_size)
    return folder


def _prompt(vocab_size: int, tokens: int) -> str:
    generator = torch.Generator().manual_seed(1)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, vocab_size, (tokens,), generator=generator))


def step_stream27(check: Check, work: Path, pcie: float | None) -> dict:
    from transformers import Gemma3TextConfig

    from jobs.paging.dense.layer_stream import load_streamed
    from jobs.paging.generate import generate
    from jobs.paging.open import spec_for

    shape = GEMMA27 if check.cuda else REHEARSE["gemma"]
    config = Gemma3TextConfig(**shape, num_hidden_layers=check.layers)
    folder = write_synthetic(work / "gemma27-shape", config, check.device)
    layer_bytes = _layer_bytes(folder)
    if check.cuda:
        torch.cuda.reset_peak_memory_stats()
    spec = spec_for(folder, device=check.device, dtype="fp16", fp16_safe="on", context_tokens=2048,
                    device_memory_bytes=EMULATED if check.cuda else None, vram_budget_bytes=3 * layer_bytes,
                    ram_budget_bytes=2 * layer_bytes)
    guard = Bf16Guard()
    with load_streamed(spec, batch_size=1) as sm, guard:
        plan = sm.plan
        result = generate(sm, [_prompt(config.vocab_size, PROMPT_TOKENS)], max_new_tokens=4, batch_size=1)
        stats = sm.stats()
    reserved = check.measured(torch.cuda.max_memory_reserved)
    h2d_s = stats["io_wait_s"] + stats["compute_s"]
    out = {"layers": check.layers, "layer_bytes": layer_bytes, "prompt_tokens": result.prompt_tokens,
           "plan_peak_device_bytes": plan.peak_device_bytes, "max_memory_reserved": reserved,
           "max_memory_allocated": check.measured(torch.cuda.max_memory_allocated),
           "within_plan": check.measured(lambda: reserved <= plan.peak_device_bytes),
           "plan_pinned_bytes": plan.peak_pinned_bytes, "pinned_bytes": stats["pinned_bytes"],
           "max_slots_in_use": stats["max_slots_in_use"], "streaming_slots": stats["streaming_slots"],
           "bytes_h2d": stats["bytes_h2d"],
           "h2d_bytes_per_s_achieved": check.measured(lambda: stats["bytes_h2d"] / h2d_s if h2d_s else None),
           "pcie_bytes_per_s": pcie, "tokens": result.tokens_generated, "wall_s": result.wall_s,
           "prefill_s": result.prefill_s, "io_wait_s": stats["io_wait_s"], "compute_s": stats["compute_s"],
           "sdpa_backends": stats.get("sdpa_backends"), "bf16_ops": guard.ops}
    if guard.ops:
        out["error"] = f"ops computed in bf16 (a 2080 Ti has none): {guard.ops}"
    return out


def step_moe(check: Check, work: Path) -> dict:
    from moe_bench import write_random_model

    from jobs.paging.moe.load import load_paged_moe
    from jobs.paging.open import spec_for

    shape = {**(MIXTRAL if check.cuda else REHEARSE["mixtral"]), "num_hidden_layers": check.moe_layers}
    folder = write_random_model(work / "mixtral-shape", shape, torch.bfloat16)
    write_tokenizer(folder, shape["vocab_size"])
    expert_bytes = 3 * shape["hidden_size"] * shape["intermediate_size"] * 2   # fp16
    budget = (check.moe_layers * 8 // 2 + 2) * expert_bytes      # half the experts in RAM, plus the staging ring
    if check.cuda:
        torch.cuda.reset_peak_memory_stats()
    guard = Bf16Guard()
    spec = spec_for(folder, device=check.device, dtype="fp16", ram_budget_bytes=budget,
                    device_memory_bytes=EMULATED if check.cuda else None, context_tokens=2048)
    with load_paged_moe(spec, batch_size=1) as moe, guard, torch.no_grad():
        ids = torch.randint(3, shape["vocab_size"], (1, PROMPT_TOKENS), device=check.device)
        logits = moe.model(input_ids=ids).logits
        stats = moe.stats()
    reserved = check.measured(torch.cuda.max_memory_reserved)
    out = {"layers": check.moe_layers, "ram_budget_bytes": budget, "host_ram_bytes": stats.get("host_ram_bytes"),
           "host_pinned_bytes": stats.get("host_pinned_bytes"), "host_pin": stats.get("host_pin"),
           "experts_from_disk": stats.get("experts_from_disk"), "logits_finite": bool(torch.isfinite(logits).all()),
           "plan_peak_device_bytes": stats.get("plan_peak_device_bytes"),
           "expert_cache_experts": stats["capacity_experts"], "max_memory_reserved": reserved,
           "within_plan": check.measured(lambda: reserved <= (stats.get("plan_peak_device_bytes") or 0)),
           "hits": stats["hits"], "misses": stats["misses"], "stall_s": stats["stall_s"], "bf16_ops": guard.ops}
    if guard.ops:
        out["error"] = f"ops computed in bf16 (a 2080 Ti has none): {guard.ops}"
    if not out["logits_finite"]:
        out["error"] = "non-finite logits"
    return out


def step_oom(check: Check) -> dict:
    if not check.cuda:
        return {"oom_kind": NOT_MEASURED}
    from jobs.contract.oom import oom_details, oom_kind

    try:
        torch.empty(2 * CARD_BYTES, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as exc:
        return {"oom_kind": oom_kind(exc), **oom_details(exc)}
    return {"oom_kind": None, "error": "no OOM under the emulated cap"}


def step_nvml(check: Check) -> dict:
    python = ROOT / ".venv" / "bin" / "python"
    code = ("import json, dataclasses; from lab_attendant.guards.host import NvmlSensors; "
            "print(json.dumps([dataclasses.asdict(r) for r in NvmlSensors().read()], default=str))")
    proc = subprocess.run([str(python if python.exists() else sys.executable), "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode:
        reason = proc.stderr.strip()[-500:]
        return {"readings": NOT_MEASURED, "reason": reason} if not check.cuda else {"error": reason}
    return {"readings": json.loads(proc.stdout)}


def step_tests(junit: Path, rc: int | None) -> dict:
    """pytest tests/gpu as its junit XML counts it (run by scripts/gpu-check.sh before this script)."""
    import xml.etree.ElementTree as ET

    if not junit.exists():
        return {"error": f"no junit report at {junit} (pytest exit {rc})"}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    out = {**counts, "pytest_rc": rc, "failed": failed}
    if failed or rc not in (0, 5, None):  # 5: nothing collected
        out["error"] = f"{len(failed)} of tests/gpu failed (pytest exit {rc})"
    return out


def _layer_bytes(folder: Path) -> int:
    from jobs.paging.dense.model_store import ModelStore

    store = ModelStore(folder)
    try:
        return max(store.layer_nbytes_as(torch.float16))
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="27B-shaped layers to write (826 MB each)")
    parser.add_argument("--moe-layers", type=int, default=4, help="Mixtral-shaped layers (2.8 GB each)")
    parser.add_argument("--rehearse", action="store_true", help="every step on the CPU, at reduced widths")
    parser.add_argument("--out", type=Path, help="report path (default: bench/results/gpu_check-<host>.json)")
    parser.add_argument("--tests-junit", type=Path, help="pytest tests/gpu's junit XML, summarized as step tests")
    parser.add_argument("--tests-rc", type=int, help="pytest tests/gpu's exit status")
    args = parser.parse_args()
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (use --rehearse to run the steps on the CPU)", file=sys.stderr)
        return 2
    kind = "gpu_check_rehearsal" if args.rehearse else "gpu_check"
    out = args.out or ROOT / "bench" / "results" / f"{kind}-{machine()['hostname']}.json"
    check = Check(out, args.rehearse, args.layers, args.moe_layers)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if args.tests_junit is not None:
            check.step("tests", lambda: step_tests(args.tests_junit, args.tests_rc))
        check.step("env", lambda: step_env(check))
        check.step("pcie", lambda: step_pcie(check))
        check.step("nvml", lambda: step_nvml(check))
        pcie = check.report["steps"]["pcie"].get("h2d_bytes_per_s")
        check.step("stream27", lambda: step_stream27(check, work, pcie if isinstance(pcie, float) else None))
        if check.cuda:
            torch.cuda.empty_cache()
        check.step("moe", lambda: step_moe(check, work))
        if check.cuda:
            torch.cuda.empty_cache()
        check.step("oom", lambda: step_oom(check))
    print(f"report: {out}", file=sys.stderr)
    return 0 if all("error" not in s for s in check.report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
