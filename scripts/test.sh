#!/usr/bin/env bash
# Set up everything, then run the whole suite: supervisor tests in .venv (no torch there), engine
# tests in the experimental venv. Any failure, or a run that collects no test (pytest exit 5), fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
# Setup places only the GGUF the default model streams; the tests also need its bf16 folder as a resident
# safetensors reference.
.venv/bin/lab-attendant model import-default --convert
venvs/experimental/bin/python -m pip install -q --disable-pip-version-check pytest pytest-timeout
# systemd-analyze lets a test verify the rendered unit file; tmux drives `watch` in a real
# terminal; headless Chromium (selenium drives Debian's chromium through chromium-driver, nothing
# downloaded) runs the dashboard's browser tests. Best effort: as root with apt (CI, a fresh
# Debian 12), install Debian's packages; without them those tests are skipped with the reason.
apt_pkgs=""
command -v systemd-analyze >/dev/null || apt_pkgs="$apt_pkgs systemd"
command -v tmux >/dev/null || apt_pkgs="$apt_pkgs tmux"
command -v chromium >/dev/null || apt_pkgs="$apt_pkgs chromium"
command -v chromedriver >/dev/null || apt_pkgs="$apt_pkgs chromium-driver"
if [ -n "$apt_pkgs" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && [ -z "${LAB_ATTENDANT_NO_APT:-}" ]; then
    echo "== apt-get install$apt_pkgs" >&2
    # shellcheck disable=SC2086 # one word per package
    { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
        apt-get install -y -qq --no-install-recommends $apt_pkgs; } >/dev/null 2>&1 \
        || echo "   could not install$apt_pkgs; the tests that need them will be skipped" >&2
fi
# A real single-node Slurm for tests/e2e/test_slurm.py: scripts/slurm.sh installs slurm-wlm and
# munge as root with apt (~15 s). Once Slurm is installed, its tests must run, not skip.
if [ -z "${LAB_ATTENDANT_NO_APT:-}" ] && bash scripts/slurm.sh install; then
    export LAB_ATTENDANT_REQUIRE_SLURM=1
else
    echo "   Slurm is not installed; the Slurm e2e tests will be skipped" >&2
fi
# The architecture and types (docs/architecture.md): lint, import contracts, mypy on both sides.
echo "== ruff check, lint-imports, mypy (supervisor side in .venv, worker side against venvs/experimental)" >&2
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
# The two mypy runs share nothing: side by side on CI's two cores (the worker side takes minutes cold).
.venv/bin/mypy lab_attendant jobs/contract jobs/paging/plan &
supervisor_mypy=$!
.venv/bin/mypy --python-executable venvs/experimental/bin/python jobs
wait "$supervisor_mypy"
echo "== supervisor tests (unit + e2e + faults), in .venv" >&2
# Two workers, one test file each at a time (--dist loadfile): most of these tests wait on subprocesses (the
# CLI, a daemon, workers), and a module's fixtures (a Slurm cluster, a dashboard) stay on one worker.
.venv/bin/python -m pytest tests/unit tests/e2e tests/faults -p no:cacheprovider --durations=15 -n 2 --dist loadfile
echo "== engine tests (engine + gpu; gpu skips without CUDA), in venvs/experimental" >&2
venvs/experimental/bin/python -m pytest tests/engine tests/gpu -p no:cacheprovider --durations=15
echo "== suite took $((SECONDS - start)) s (setup included)" >&2
