#!/usr/bin/env bash
# The one prepared GPU check (issues #14, #29): run first whenever a GPU is lent; <= 8 minutes on one GPU.
#   1. pytest tests/gpu under TORCH_CUDA_SANITIZER=1 (stream-ordering races fail loudly); no -x: every test
#      runs and $OUT/gpu-tests.xml says which failed
#   2. bench/gpu_check.py: env, PCIe from a cudaHostRegister'ed arena, 27B-shaped layers streamed and
#      Mixtral-shaped experts paged under an emulated RTX 2080 Ti (allocator cap, flash/cuDNN SDPA off, fp16,
#      a guard on bf16 compute) with a ~2000-token prompt, plan vs max_memory_reserved, a provoked OOM, NVML;
#      its JSON report is rewritten after every step, so a run cut short still leaves what it measured.
# Usage: bash scripts/gpu-check.sh [--rehearse] [--layers 6] [--moe-layers 4]
#   --rehearse  every step on the CPU (CUDA hidden), at reduced widths; CUDA-only values read "not measured"
# Runs on a bare GPU machine: the image's python3 (PyTorch, transformers, safetensors there), nothing from
# models/, no network. A module the image lacks is installed with pip --no-index from the git-ignored wheel
# folder gpu-wheels/ (or $GPU_CHECK_WHEELS) into gpu-wheels/site, put first on PYTHONPATH; fill it beforehand,
# on a machine with network and the GPU machine's python version, with e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       -d gpu-wheels accelerate hqq pytest
# Python: $LAB_ATTENDANT_WORKER_PYTHON, else venvs/experimental/bin/python when present, else python3.
# Report: $OUT/gpu_check.json (or gpu_check_rehearsal.json); $OUT defaults to bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
rehearse=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; shift; fi
PY=${LAB_ATTENDANT_WORKER_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x venvs/experimental/bin/python ]; then PY=venvs/experimental/bin/python; else PY=python3; fi
fi
WHEELS=${GPU_CHECK_WHEELS:-gpu-wheels}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
start=$SECONDS

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ("torch", "transformers", "safetensors", "tokenizers", "accelerate", "hqq", "pytest")
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if [ -d "$WHEELS" ]; then
        echo "== installing $missing from $WHEELS (no index)" >&2
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEELS" \
            --target "$WHEELS/site" $missing \
            || echo "gpu-check: could not install $missing from $WHEELS; the steps that need them will fail" >&2
        export PYTHONPATH="$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu-check: $PY lacks $missing and there is no wheel folder $WHEELS (see the top of this script)" >&2
    fi
fi

if [ "$rehearse" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    report="$OUT_DIR/gpu_check_rehearsal.json"
    bench_args=(--rehearse --layers 2 --moe-layers 2)
    sanitizer=()
else
    report="$OUT_DIR/gpu_check.json"
    bench_args=()
    sanitizer=(env TORCH_CUDA_SANITIZER=1)
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
        || { echo "gpu-check: $PY has no CUDA torch (use --rehearse on a CPU machine)" >&2; exit 2; }
fi

echo "== pytest tests/gpu${sanitizer:+ (TORCH_CUDA_SANITIZER=1)}" >&2
"${sanitizer[@]}" timeout 210 "$PY" -m pytest tests/gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml"
tests_rc=$?
echo "== bench/gpu_check.py -> $report" >&2
timeout 260 "$PY" bench/gpu_check.py "${bench_args[@]}" --out "$report" \
    --tests-junit "$OUT_DIR/gpu-tests.xml" --tests-rc "$tests_rc" "$@"
check_rc=$?
echo "== gpu-check took $((SECONDS - start)) s: tests rc=$tests_rc, check rc=$check_rc; report $report" >&2
[ "$tests_rc" = 0 ] || [ "$tests_rc" = 5 ] || exit 1
[ "$check_rc" = 0 ]
