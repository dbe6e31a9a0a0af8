#!/usr/bin/env bash
# The API contract check: schemathesis (pinned, installed into target/pycontract) generates
# requests from the OpenAPI document a running wick serves, sends them, and checks every answer
# against the document: all checks, a fixed seed, a bounded number of cases per operation
# (integration-tests/contract/wick_contract.py adapts one check; it says how and why).
#
#   scripts/contract-check.sh URL [EXAMPLES [SEED]]  against the wick at URL (CI runs it on a
#                                                    tiny model: integration-tests/tests/contract.rs)
#   make contract                                    the longer run: the default model served
#                                                    with the release build, 100 cases, 2 seeds
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
examples=${2:-20}
seed=${3:-1}
deps="$root/target/pycontract"
pins="schemathesis==4.32.5"

if [ "$(cat "$deps/.pins" 2>/dev/null)" != "$pins" ]; then
  rm -rf "$deps"
  # --target never touches the system's packages.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
    --target "$deps" $pins >&2
  echo "$pins" > "$deps/.pins"
fi

work=$(mktemp -d)
wick=
cleanup() {
  [ -n "$wick" ] && { kill "$wick" 2>/dev/null; wait "$wick" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

url=${1:-serve}
if [ "$url" = serve ]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$root/target/release/wick" --model-id "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --hostname 127.0.0.1 --port "$port" --shard-uds-path "$work/wick" --kv-cache-memory 256MiB \
    --max-input-tokens 256 --max-total-tokens 320 --max-batch-prefill-tokens 512 \
    --request-deadline 120 > "$work/wick.log" 2>&1 &
  wick=$!
  url="http://127.0.0.1:$port"
  for _ in $(seq 240); do
    python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "$url/health" 2> /dev/null && break
    kill -0 "$wick" 2>/dev/null || { cat "$work/wick.log" >&2; exit 1; }
    sleep 0.5
  done
fi

cd "$work"
PYTHONPATH="$deps:$root/integration-tests/contract" SCHEMATHESIS_HOOKS=wick_contract \
  python3 -m schemathesis.cli run "$url/api-doc/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "$examples" --seed "$seed" --generation-database none --workers 1 \
  --request-timeout 150 --suppress-health-check all --no-color
