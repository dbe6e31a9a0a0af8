#!/usr/bin/env bash
# Checks wick on an NVIDIA machine (CUDA toolkit and NCCL installed): builds with NCCL, runs the
# GPU tensor-parallel test (ranks on GPUs over NCCL against the CPU model) and times decode of
# SmolLM2-135M on one GPU with wick-bench. Usage: scripts/gpu-check.sh [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpus.csv"

cargo test --release -p wick-backend-candle --features nccl --test tensor_parallel \
  cuda_ranks_over_nccl_match_the_cpu_model -- --nocapture 2>&1 | tee "$out/equality.log"

cargo build --release --features wick-backend-candle/nccl
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || scripts/fetch-model.sh
base="$(mktemp -d)/wick"
./target/release/wick-shard serve --model-id "$model" --uds-path "$base" --device cuda \
  --kv-cache-memory 1GiB > "$out/shard.log" 2>&1 &
shard=$!
trap 'kill $shard 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do [ -S "$base-0" ] && break; sleep 0.2; done
./target/release/wick-bench shard -m "$base-0" -b 1,8,32 -s 64 -d 32 -r 3 \
  --json "$out/decode-cuda.json" 2>&1 | tail -20 | tee "$out/decode-cuda.md"
