# Sourced by the check scripts: pinned Python packages, and the default model served on a free
# loopback port.

# pip_pinned DIR PINS: makes DIR hold exactly PINS (e.g. "openai==3.63.0 pydantic==2.14.4"),
# installing only when they changed. `pip --target` never touches the system's packages.
pip_pinned() {
  local dir=$1 pins=$2
  if [ "$(cat "$dir/.pins" 2>/dev/null)" != "$pins" ]; then
    rm -rf "$dir"
    # shellcheck disable=SC2086 # one argument per pin
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
      --target "$dir" $pins >&2
    echo "$pins" > "$dir/.pins"
  fi
}

# serve_default ROOT PROFILE WORK [ARG...]: starts target/PROFILE/wick on the default model with
# its sockets and log (wick.log) in WORK and ARG... added, and waits until /health answers.
# Sets WICK_PID and WICK_URL; the caller stops it (stop_wick).
serve_default() {
  local root=$1 profile=$2 work=$3
  shift 3
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$root/target/$profile/wick" --model-id "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --hostname 127.0.0.1 --port "$port" --shard-uds-path "$work/wick" "$@" \
    > "$work/wick.log" 2>&1 &
  WICK_PID=$!
  WICK_URL="http://127.0.0.1:$port"
  for _ in $(seq 240); do
    python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "$WICK_URL/health" 2> /dev/null && return 0
    kill -0 "$WICK_PID" 2>/dev/null || { cat "$work/wick.log" >&2; return 1; }
    sleep 0.5
  done
  echo "wick did not answer /health in 120 s" >&2
  return 1
}

# stop_wick: stops the wick serve_default started, if any.
stop_wick() {
  if [ -n "${WICK_PID:-}" ]; then
    kill "$WICK_PID" 2>/dev/null || true
    wait "$WICK_PID" 2>/dev/null || true
  fi
}
