#!/usr/bin/env bash
# Real clients against a real wick: serves the default model with the binaries of the given
# cargo profile (debug by default, as `cargo test` builds them) and runs
# integration-tests/clients/structured.py with the OpenAI SDK and huggingface_hub, installed
# into target/pyclients (pinned versions).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
profile=${1:-debug}
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
deps="$root/target/pyclients"
pins="openai==3.63.0 pydantic==2.14.4 huggingface_hub==2.4.0"

if [ "$(cat "$deps/.pins" 2>/dev/null)" != "$pins" ]; then
  rm -rf "$deps"
  # --target never touches the system's packages.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
    --target "$deps" $pins >&2
  echo "$pins" > "$deps/.pins"
fi

tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$root/target/$profile/wick" --model-id "$model" --port "$port" --shard-uds-path "$tmp/wick" \
  --kv-cache-memory 128MiB --max-batch-prefill-tokens 512 --max-input-tokens 512 \
  --max-total-tokens 1024 > "$tmp/wick.log" 2>&1 &
wick=$!
trap 'kill $wick 2>/dev/null; wait $wick 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 240); do
  python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$port/health" 2> /dev/null && break
  kill -0 $wick 2>/dev/null || { cat "$tmp/wick.log" >&2; exit 1; }
  sleep 0.5
done
PYTHONPATH="$deps" python3 "$root/integration-tests/clients/structured.py" "http://127.0.0.1:$port" || {
  tail -n 50 "$tmp/wick.log" >&2
  exit 1
}
