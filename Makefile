# wick's two entry points: `make serve` (the default model) and `make test` (everything CI runs).

MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
PORT ?= 3000

.PHONY: serve test model build fmt lint client-check stress contract

model:
	scripts/fetch-model.sh

build:
	cargo build --release

serve: model build
	./target/release/wick --model-id $(MODEL) --port $(PORT)

test: model
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace
	scripts/client-check.sh

fmt:
	cargo fmt --all

lint:
	cargo clippy --workspace --all-targets -- -D warnings

# The OpenAI SDK and huggingface_hub against a served default model (part of `make test`).
client-check: model
	cargo build --bin wick --bin wick-router --bin wick-shard
	scripts/client-check.sh

# The full reliability suite against the default model (README, "Reliability"); `make test`
# runs its short version on a tiny model.
stress: model build
	./target/release/wick-bench stress --model-id $(MODEL)

# The API contract check's longer run (README, "API contract"): schemathesis against the default
# model, 100 cases per operation, two seeds (about 30 minutes); `make test` runs a short one on
# a tiny model.
contract: model build
	for seed in 1 2; do scripts/contract-check.sh serve 100 $$seed || exit 1; done
