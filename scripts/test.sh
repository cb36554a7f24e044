#!/usr/bin/env bash
# Set up everything, then run the whole suite: supervisor tests in .venv (no torch there), engine
# tests in the experimental venv. Any failure, or a run that collects no test (pytest exit 5), fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
venvs/experimental/bin/python -m pip install -q --disable-pip-version-check pytest pytest-timeout
# systemd-analyze lets a test verify the rendered unit file. Best effort: as root with apt (CI,
# a fresh Debian 12), install Debian's `systemd` package; without it that test is skipped.
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && [ -z "${LAB_ATTENDANT_NO_APT:-}" ]; then
    echo "== systemd-analyze (apt-get install systemd)" >&2
    { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
        apt-get install -y -qq --no-install-recommends systemd; } >/dev/null 2>&1 \
        || echo "   could not install systemd; the systemd-analyze test will be skipped" >&2
fi
# Headless Chromium for the dashboard's browser tests (selenium drives Debian's chromium through
# chromium-driver; nothing is downloaded by selenium). Same rules: root + apt, best effort.
if ! { command -v chromium && command -v chromedriver; } >/dev/null && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null && [ -z "${LAB_ATTENDANT_NO_APT:-}" ]; then
    echo "== chromium (apt-get install chromium chromium-driver)" >&2
    { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
        || echo "   could not install chromium; the dashboard browser test will be skipped" >&2
fi
echo "== supervisor tests (unit + e2e + faults), in .venv" >&2
.venv/bin/python -m pytest tests/unit tests/e2e tests/faults -p no:cacheprovider
echo "== engine tests (engine + gpu; gpu skips without CUDA), in venvs/experimental" >&2
venvs/experimental/bin/python -m pytest tests/engine tests/gpu -p no:cacheprovider
echo "== suite took $((SECONDS - start)) s (setup included)" >&2
