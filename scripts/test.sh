#!/usr/bin/env bash
# Set up everything, then run the whole suite: supervisor tests in .venv (no torch there), engine
# tests in the experimental venv. Any failure, or a run that collects no test (pytest exit 5), fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
venvs/experimental/bin/python -m pip install -q --disable-pip-version-check pytest pytest-timeout
echo "== supervisor tests (unit + e2e)" >&2
.venv/bin/python -m pytest tests/unit tests/e2e -p no:cacheprovider
echo "== suite took $((SECONDS - start)) s (setup included)" >&2
