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
. "$root/scripts/lib.sh"
examples=${2:-20}
seed=${3:-1}
deps="$root/target/pycontract"
pip_pinned "$deps" "schemathesis==4.32.5"

work=$(mktemp -d)
trap 'stop_wick; rm -rf "$work"' EXIT
url=${1:-serve}
if [ "$url" = serve ]; then
  serve_default "$root" release "$work" --kv-cache-memory 256MiB --max-input-tokens 256 \
    --max-total-tokens 320 --max-batch-prefill-tokens 512 --request-deadline 120
  url=$WICK_URL
fi

cd "$work"
PYTHONPATH="$deps:$root/integration-tests/contract" SCHEMATHESIS_HOOKS=wick_contract \
  python3 -m schemathesis.cli run "$url/api-doc/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "$examples" --seed "$seed" --generation-database none --workers 1 \
  --request-timeout 150 --suppress-health-check all --no-color
