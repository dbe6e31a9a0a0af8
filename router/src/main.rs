//! `wick-router`: connects to the shards, then serves TGI's and OpenAI's HTTP APIs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wick_router::server::{self, Config, ServerConfig, ValidationFlags};
use wick_router::telemetry;
use wick_scheduler::startup::{self, ShardSetup};

/// wick's router: HTTP APIs, validation, queue, continuous batching, metrics.
#[derive(Parser)]
#[command(name = "wick-router", version, about)]
struct Args {
    /// Unix socket of shard rank 0 (the shard's `--uds-path` followed by `-0`); the other ranks
    /// are discovered through it.
    #[arg(
        long,
        env = "MASTER_SHARD_UDS_PATH",
        default_value = "/tmp/wick-server-0"
    )]
    master_shard_uds_path: PathBuf,

    /// Model name reported by `/info`, `/v1/models` and the `model` field of OpenAI answers;
    /// defaults to what the shard reports.
    #[arg(long, env = "MODEL_ID")]
    model_id: Option<String>,

    /// Requests in flight at once; beyond it, new requests get 429 at once (no waiting).
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    max_concurrent_requests: usize,

    /// Largest accepted `best_of` (only 1 is served; larger values get a clear 422).
    #[arg(long, env = "MAX_BEST_OF", default_value_t = 2)]
    max_best_of: usize,

    /// Most stop sequences per request.
    #[arg(long, env = "MAX_STOP_SEQUENCES", default_value_t = 4)]
    max_stop_sequences: usize,

    /// Most alternative tokens reported per position (`top_n_tokens`, `top_logprobs`).
    #[arg(long, env = "MAX_TOP_N_TOKENS", default_value_t = 5)]
    max_top_n_tokens: u32,

    /// Longest prompt in tokens (after truncation); derived from the model and the KV cache
    /// when absent.
    #[arg(long, env = "MAX_INPUT_TOKENS")]
    max_input_tokens: Option<u32>,

    /// Longest prompt + generation in tokens; derived from the model and the KV cache when
    /// absent.
    #[arg(long, env = "MAX_TOTAL_TOKENS")]
    max_total_tokens: Option<u32>,

    /// Admit waiting requests into a running batch once they are at least this fraction of it
    /// (TGI's rule for shards without chunked prefill).
    #[arg(long, env = "WAITING_SERVED_RATIO", default_value_t = 0.3)]
    waiting_served_ratio: f32,

    /// Prompt tokens one prefill step may compute. Longer prompts are prefilled in chunks, so
    /// this bounds the latency a new request adds to running ones; sized for CPU serving
    /// (TGI's GPU default is 4096).
    #[arg(long, env = "MAX_BATCH_PREFILL_TOKENS", default_value_t = 1024)]
    max_batch_prefill_tokens: u32,

    /// Tokens (prompt + generation) all running requests may hold; by default what the shard's
    /// KV cache holds.
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS")]
    max_batch_total_tokens: Option<u32>,

    /// Decode steps a waiting request may wait before it forces a prefill.
    #[arg(long, env = "MAX_WAITING_TOKENS", default_value_t = 20)]
    max_waiting_tokens: usize,

    /// Most requests in one batch (unbounded when absent).
    #[arg(long, env = "MAX_BATCH_SIZE")]
    max_batch_size: Option<usize>,

    /// Most prompts × `n` in one `/v1/completions` request.
    #[arg(long, env = "MAX_CLIENT_BATCH_SIZE", default_value_t = 4)]
    max_client_batch_size: usize,

    /// Threads that tokenize prompts.
    #[arg(long, env = "VALIDATION_WORKERS", default_value_t = 2)]
    validation_workers: usize,

    /// Address to listen on.
    #[arg(long, env = "HOSTNAME", default_value = "0.0.0.0")]
    hostname: String,

    /// Port to listen on.
    #[arg(long, short, env = "PORT", default_value_t = 3000)]
    port: u16,

    /// Require `Authorization: Bearer <key>` on generation routes. Never logged.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Allowed CORS origin (repeatable); `*` for any. None by default: CORS is closed.
    #[arg(long, env = "CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    cors_allow_origin: Vec<String>,

    /// Log as JSON lines.
    #[arg(long, env = "JSON_OUTPUT")]
    json_output: bool,

    /// Export traces over OTLP/gRPC to this collector (e.g. `http://otel-collector:4317`): a
    /// span per request, with its validation, queue, prefill and decode.
    #[arg(long, env = "OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// The `service.name` of the exported traces.
    #[arg(long, env = "OTLP_SERVICE_NAME", default_value = "wick.router")]
    otlp_service_name: String,

    /// Largest accepted request body in bytes (413 beyond).
    #[arg(long, env = "PAYLOAD_LIMIT", default_value_t = 2_000_000)]
    payload_limit: usize,

    /// Seconds a request may run from its arrival (queue included) before it is cancelled
    /// with a 504, or an error event on a stream. None by default.
    #[arg(long, env = "REQUEST_DEADLINE", value_parser = positive_seconds)]
    request_deadline: Option<std::time::Duration>,
}

impl Args {
    fn shard_setup(&self) -> ShardSetup {
        ShardSetup {
            master_shard_uds_path: self.master_shard_uds_path.clone(),
            max_input_tokens: self.max_input_tokens,
            max_total_tokens: self.max_total_tokens,
            max_batch_prefill_tokens: self.max_batch_prefill_tokens,
            max_batch_total_tokens: self.max_batch_total_tokens,
            max_batch_size: self.max_batch_size,
            waiting_served_ratio: self.waiting_served_ratio,
            max_waiting_tokens: self.max_waiting_tokens,
            max_concurrent_requests: self.max_concurrent_requests,
        }
    }

    fn config(&self) -> Config {
        Config {
            server: ServerConfig {
                model_id: self.model_id.clone(),
                api_key: self.api_key.clone(),
                cors_allow_origin: self.cors_allow_origin.clone(),
                request_deadline: self.request_deadline,
                payload_limit: self.payload_limit,
                max_client_batch_size: self.max_client_batch_size,
                max_concurrent_requests: self.max_concurrent_requests,
            },
            validation: ValidationFlags {
                max_best_of: self.max_best_of,
                max_stop_sequences: self.max_stop_sequences,
                max_top_n_tokens: self.max_top_n_tokens,
                validation_workers: self.validation_workers,
            },
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let (infer, backend) = startup::connect(&args.shard_setup()).await?;
    let listener = tokio::net::TcpListener::bind((args.hostname.as_str(), args.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", args.hostname, args.port))?;
    server::run(
        args.config(),
        std::sync::Arc::new(infer),
        backend,
        listener,
        shutdown_signal(),
    )
    .await
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let otlp = args.otlp_endpoint.clone().map(|endpoint| telemetry::Otlp {
        endpoint,
        service_name: args.otlp_service_name.clone(),
    });
    let traces = {
        let _runtime = runtime.enter();
        match telemetry::init(args.json_output, otlp.as_ref()) {
            Ok(traces) => traces,
            Err(e) => {
                eprintln!("cannot set up logging and tracing: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    let code = match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    // The last spans leave before the runtime (which drives the exporter's channel) goes.
    if let Some(traces) = traces {
        if let Err(e) = traces.shutdown() {
            eprintln!("exporting the last traces failed: {e}");
        }
    }
    code
}

/// A positive, finite number of seconds.
fn positive_seconds(text: &str) -> Result<std::time::Duration, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("{text:?} is not a positive number of seconds"));
    }
    std::time::Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}
