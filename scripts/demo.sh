#!/usr/bin/env bash
# Set up everything, then run nightly insights over the sample archive (examples/archive) on the
# embedded default model (Gemma-3-270M, its 4-bit GGUF streamed on CPU) with a one-shot daemon, and show them.
# DEMO_MAX_NOTES (default 8) caps the notes read this run; a rerun picks up the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lab=.venv/bin/lab-attendant
start=$SECONDS
id=$($lab submit nightly_insights -p archive=examples/archive -p max_notes="${DEMO_MAX_NOTES:-8}")
echo "== submitted nightly_insights run $id; running a one-shot daemon (--burst)" >&2
$lab daemon --burst --experimental-paging
$lab show "$id"
result=$($lab show "$id" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["result_path"] or "")')
if [ -n "$result" ]; then
  echo "== insights written to $result and $(dirname "$result")/insights.md ($((SECONDS - start)) s)" >&2
  cat "$(dirname "$result")/insights.md"
fi
[ "$($lab show "$id" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["state"])')" = succeeded ]
