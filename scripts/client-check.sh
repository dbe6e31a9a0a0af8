#!/usr/bin/env bash
# Real clients against a real wick: serves the default model with the binaries of the given
# cargo profile (debug by default, as `cargo test` builds them) and runs
# integration-tests/clients/structured.py with the OpenAI SDK and huggingface_hub, installed
# into target/pyclients (pinned versions).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
profile=${1:-debug}
deps="$root/target/pyclients"
pip_pinned "$deps" "openai==3.63.0 pydantic==2.14.4 huggingface_hub==2.4.0"

work=$(mktemp -d)
trap 'stop_wick; rm -rf "$work"' EXIT
serve_default "$root" "$profile" "$work" --kv-cache-memory 128MiB \
  --max-batch-prefill-tokens 512 --max-input-tokens 512 --max-total-tokens 1024
PYTHONPATH="$deps" python3 "$root/integration-tests/clients/structured.py" "$WICK_URL" || {
  tail -n 50 "$work/wick.log" >&2
  exit 1
}
