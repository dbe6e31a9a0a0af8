# wick: CPU image by default. For the CUDA variant pass
#   --build-arg VARIANT=cuda --build-arg BUILD_IMAGE=<a CUDA devel image with Rust installed>
#   --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
# (the CUDA code sits behind the `cuda` and `nccl` cargo features of wick-backend-candle; the
# cuda variant builds both, so tensor-parallel shards on GPUs reduce over NCCL).
ARG VARIANT=cpu
ARG BUILD_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- build ------------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
ARG VARIANT
WORKDIR /src

# Dependencies first, in their own layer: only the manifests and empty targets.
COPY Cargo.toml Cargo.lock ./
COPY proto/Cargo.toml proto/build.rs proto/generate.proto proto/
COPY backends/model/Cargo.toml backends/model/
COPY backends/kernels/Cargo.toml backends/kernels/
COPY backends/candle/Cargo.toml backends/candle/
COPY backends/grammar/Cargo.toml backends/grammar/
COPY router/Cargo.toml router/
COPY router/scheduler/Cargo.toml router/scheduler/
COPY launcher/Cargo.toml launcher/
COPY benchmark/Cargo.toml benchmark/
COPY integration-tests/Cargo.toml integration-tests/
RUN for d in proto backends/model backends/kernels backends/candle backends/grammar router router/scheduler launcher benchmark; do \
        mkdir -p $d/src/bin && echo 'fn main() {}' > $d/src/main.rs && touch $d/src/lib.rs; \
    done \
 && echo 'fn main() {}' > backends/candle/src/bin/wick-shard.rs \
 && mkdir -p integration-tests/tests \
 && cargo build --release --workspace --bins || true

COPY . .
RUN touch proto/src/lib.rs backends/model/src/lib.rs backends/kernels/src/lib.rs \
    backends/candle/src/lib.rs backends/grammar/src/lib.rs router/src/lib.rs \
    router/scheduler/src/lib.rs \
 && FEATURES=$([ "$VARIANT" = cuda ] && echo "--features wick-backend-candle/nccl" || true) \
 && cargo build --release --bin wick --bin wick-shard --bin wick-router --bin wick-bench $FEATURES

# ---- run --------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS run
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 wick \
 && mkdir -p /data && chown wick /data
COPY --from=build /src/target/release/wick /src/target/release/wick-shard \
     /src/target/release/wick-router /src/target/release/wick-bench /usr/local/bin/

# As TGI's image: models and the Hugging Face cache under /data, the API on $PORT.
ENV HF_HOME=/data \
    PORT=80
EXPOSE 80
VOLUME /data
USER wick
# Healthy once the model is loaded and the router answers /health (bash's /dev/tcp: the slim
# image has no HTTP client). The start period covers a model download.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT} && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["wick"]
