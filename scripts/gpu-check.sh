#!/usr/bin/env bash
# The one prepared GPU check (issue #14): run first whenever a GPU is lent; <= 8 minutes on one GPU.
#   1. pytest tests/gpu with TORCH_CUDA_SANITIZER=1 (stream-ordering races in the streaming tests fail loudly)
#   2. bench/gpu_check.py: PCIe bandwidth, a 27B-shaped model streamed under an emulated RTX 2080 Ti
#      (allocator capped at 10.76 GiB less the context, fp16) with max_memory_allocated() vs the memory plan,
#      Mixtral-shaped paging under the same cap with a RAM budget, a provoked CUDA OOM, real NVML readings.
# Writes bench/results/gpu_check_<host>_<time>.json (and $OUT/gpu_check.json when $OUT is set).
# Usage: bash scripts/gpu-check.sh [--layers 6] [--moe-layers 4]
# Needs a python with CUDA torch, transformers, safetensors, accelerate, hqq (venvs/experimental, else python3 /
# $LAB_ATTENDANT_WORKER_PYTHON) and the embedded model's tokenizer files (models/gemma-3-270m/tokenizer*.json:
# on a lent machine, carry them). Time limits below keep the whole check under 8 minutes (3.5 + 4.3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${LAB_ATTENDANT_WORKER_PYTHON:-venvs/experimental/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
    || { echo "gpu-check: $PY has no CUDA torch; nothing to check" >&2; exit 2; }
start=$SECONDS
echo "== pytest tests/gpu (TORCH_CUDA_SANITIZER=1)" >&2
TORCH_CUDA_SANITIZER=1 timeout 210 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -x \
    --junitxml="${OUT:-/tmp}/gpu-tests.xml"
tests_rc=$?
echo "== bench/gpu_check.py" >&2
out_args=()
[ -n "${OUT:-}" ] && out_args=(--out "$OUT/gpu_check.json")
timeout 260 "$PY" bench/gpu_check.py "${out_args[@]}" "$@"
check_rc=$?
echo "== gpu-check took $((SECONDS - start)) s: tests rc=$tests_rc, check rc=$check_rc" >&2
[ "$tests_rc" = 0 ] && [ "$check_rc" = 0 ]
