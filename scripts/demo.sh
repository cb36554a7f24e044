#!/usr/bin/env bash
# Set up everything, then run the main job on the embedded default model with a one-shot daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lab=.venv/bin/lab-attendant
id=$($lab submit probe -p path=models/gemma-3-270m)
echo "== submitted run $id; running a one-shot daemon (--burst)" >&2
$lab daemon --burst --experimental-paging
$lab show "$id"
result=$($lab show "$id" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["result_path"] or "")')
[ -n "$result" ] && cat "$result"
[ "$($lab show "$id" --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["state"])')" = succeeded ]
