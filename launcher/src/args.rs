//! The launcher's command line: every flag is also an environment variable, and the checks
//! on flag combinations that must fail before any child process starts.

use std::path::PathBuf;
use std::time::Duration;
use wick_model::parse_bytes;

use anyhow::{bail, Result};
use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};

/// `wick`: serve a model over HTTP (TGI and OpenAI APIs) with one command.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "wick",
    version,
    about = "Serve an LLM over HTTP: starts the model shards and the router, and supervises them"
)]
pub struct Args {
    /// The model to serve: a Hugging Face Hub id (`org/name`), a local folder in Hub layout
    /// (`config.json`, `tokenizer.json`, `*.safetensors`) or a local `.gguf` file. Hub models
    /// are downloaded once, before any shard starts.
    #[arg(long, env = "MODEL_ID")]
    pub model_id: String,

    /// Hub revision (branch, tag or commit) when `--model-id` is a Hub id.
    #[arg(long, env = "REVISION")]
    pub revision: Option<String>,

    /// Number of shards: tensor-parallel ranks of one model, each a process holding 1/N of the
    /// attention heads, MLP features and vocabulary. The model's attention and KV head counts
    /// must divide by it. On CPU the shards share the host's cores (see `--shard-threads`).
    #[arg(long, env = "NUM_SHARD", default_value_t = 1)]
    pub num_shard: usize,

    /// Quantize dense (safetensors) weights at load time. GGUF files keep their own
    /// quantization.
    #[arg(long, env = "QUANTIZE", value_enum)]
    pub quantize: Option<Quantize>,

    /// The highest instruction set the shards' CPU kernels use: `auto`, `avx512`, `avx2` or
    /// `scalar` (every level computes the same bits; lower ones are for comparing hosts).
    #[arg(long, env = "CPU_KERNELS", value_enum)]
    pub cpu_kernels: Option<CpuKernels>,

    /// What the quantized CPU kernels do with a block of 32 activations whose largest value
    /// exceeds 4.5× the block's RMS (the outlier channels real models carry): `refine` (the
    /// default) quantizes its rounding error again and multiplies that too, closer to the f32
    /// path; `plain` keeps every block 8-bit as llama.cpp does, faster where activations have
    /// heavy tails (6% more tokens/s at 32 streams on the random-weight Llama-3.2-1B shape).
    #[arg(long, env = "ACTIVATION_OUTLIERS", value_enum)]
    pub activation_outliers: Option<ActivationOutliers>,

    /// Element type of the KV cache: `auto` (f16), `f16`, `bf16`, `f32` or `q8_0`. 16-bit values
    /// take half the memory of f32 (so `--kv-cache-memory` holds twice the tokens) and half its
    /// read traffic in attention; each K/V value is rounded once, when written. `q8_0` (opt-in)
    /// stores blocks of 32 values as 8-bit integers with an f16 scale: 1.06 bytes a value,
    /// nearly twice f16's tokens, further from the f32 path (see the README).
    #[arg(long, env = "KV_CACHE_DTYPE", value_enum)]
    pub kv_cache_dtype: Option<KvCacheDtype>,

    /// Compute dtype of dense weights (default float32). bfloat16 keeps dense linear weights in
    /// bf16 on wick's CPU kernels: half the memory of float32.
    #[arg(long, env = "DTYPE", value_enum)]
    pub dtype: Option<Dtype>,

    /// Requests processed at once; more get 429 `Model is overloaded`. Protects the server
    /// from unbounded queues.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,

    /// Largest `best_of` a request may ask for.
    #[arg(long, env = "MAX_BEST_OF", default_value_t = 2)]
    pub max_best_of: usize,

    /// Largest number of stop sequences a request may carry.
    #[arg(long, env = "MAX_STOP_SEQUENCES", default_value_t = 4)]
    pub max_stop_sequences: usize,

    /// Largest `top_n_tokens` (alternatives returned per token) a request may ask for.
    #[arg(long, env = "MAX_TOP_N_TOKENS", default_value_t = 5)]
    pub max_top_n_tokens: u32,

    /// Longest prompt in tokens. Unset: the router derives it from the model and the KV cache
    /// at warmup. Must be below `--max-total-tokens`.
    #[arg(long, env = "MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,

    /// Longest prompt plus generation in tokens: the memory budget of one request. Unset: the
    /// router derives it at warmup.
    #[arg(long, env = "MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,

    /// How many waiting requests, relative to running ones, make the router pause decoding to
    /// prefill them (ignored when prompts are chunked).
    #[arg(long, env = "WAITING_SERVED_RATIO", default_value_t = 0.3)]
    pub waiting_served_ratio: f32,

    /// Most prompt tokens in one prefill step; bounds the latency a new request adds to the
    /// running ones. Unset: the router's default.
    #[arg(long, env = "MAX_BATCH_PREFILL_TOKENS")]
    pub max_batch_prefill_tokens: Option<u32>,

    /// Most tokens (prompt and generated) held by all running requests together. Unset: the
    /// router takes what the shards' KV cache holds (warmup).
    #[arg(long, env = "MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: Option<u32>,

    /// Decode steps a waiting request may wait before the router forces a prefill for it
    /// (ignored when prompts are chunked).
    #[arg(long, env = "MAX_WAITING_TOKENS", default_value_t = 20)]
    pub max_waiting_tokens: usize,

    /// Most requests in one running batch. Unset: bounded by the KV cache only.
    #[arg(long, env = "MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,

    /// Most prompts in one `/v1/completions` request.
    #[arg(long, env = "MAX_CLIENT_BATCH_SIZE", default_value_t = 4)]
    pub max_client_batch_size: usize,

    /// Tokenizer workers in the router (validation runs on them).
    #[arg(long, env = "VALIDATION_WORKERS", default_value_t = 2)]
    pub validation_workers: usize,

    /// Address the HTTP server binds.
    #[arg(long, env = "HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: String,

    /// Port the HTTP server listens on.
    #[arg(short, long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Base path of the shards' unix sockets; shard `r` listens on `{shard_uds_path}-{r}`.
    /// Use a distinct path per deployment on one machine.
    #[arg(long, env = "SHARD_UDS_PATH", default_value = "/tmp/wick-server")]
    pub shard_uds_path: PathBuf,

    /// The Hugging Face Hub cache folder (default: `$HF_HOME/hub` or
    /// `~/.cache/huggingface/hub`).
    #[arg(long, env = "HUGGINGFACE_HUB_CACHE")]
    pub huggingface_hub_cache: Option<PathBuf>,

    /// Never reach the Hugging Face Hub: a Hub id must already be in the cache.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = BoolishValueParser::new())]
    pub offline: bool,

    /// Log as JSON lines instead of human-readable text (the children's lines too).
    #[arg(long, env = "JSON_OUTPUT", value_parser = BoolishValueParser::new())]
    pub json_output: bool,

    /// Require `Authorization: Bearer <key>` on the generation routes.
    // hide_env_values: `--help` must not print the key taken from the environment.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Origins allowed by CORS (repeat the flag for several; `*` for any); none by default.
    #[arg(long, env = "CORS_ALLOW_ORIGIN")]
    pub cors_allow_origin: Vec<String>,

    /// Largest HTTP request body in bytes.
    #[arg(long, env = "PAYLOAD_LIMIT", default_value_t = 2_000_000)]
    pub payload_limit: usize,

    /// Export traces over OTLP/gRPC to this collector (e.g. `http://otel-collector:4317`): a
    /// span per request with children for validation, queue, prefill and decode; the caller's
    /// W3C `traceparent` is their parent.
    #[arg(long, env = "OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` of the exported traces.
    #[arg(long, env = "OTLP_SERVICE_NAME", default_value = "wick.router")]
    pub otlp_service_name: String,

    /// Seconds a request may run from its arrival (queue included) before the router cancels
    /// it with a 504, or an error event on a stream. None by default.
    #[arg(long, env = "REQUEST_DEADLINE")]
    pub request_deadline: Option<f64>,

    /// Seconds each child gets to exit after SIGTERM (the router drains in-flight requests)
    /// before it is killed.
    #[arg(
        short,
        long,
        env = "GRACEFUL_TERMINATION_TIMEOUT",
        default_value_t = 90
    )]
    pub graceful_termination_timeout: u64,

    /// Compute threads per shard (default: the cores divided among the shards, at least 1).
    #[arg(long, env = "SHARD_THREADS")]
    pub shard_threads: Option<usize>,

    /// Seconds a shard waits for the other shards in each tensor-parallel exchange (and when
    /// they first meet); a shard that takes longer is reported as hung and the set stops.
    #[arg(long, env = "COLLECTIVE_TIMEOUT", default_value_t = 60.0)]
    pub collective_timeout: f64,

    /// Memory for each shard's KV cache, e.g. `2GiB`, `512MiB`, `1.5GB` or plain bytes. It
    /// bounds how many tokens all running requests hold together.
    #[arg(long, env = "KV_CACHE_MEMORY", default_value = "2GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: u64,

    /// Seconds a shard may take to load the model and answer its health check before the
    /// launcher gives up.
    #[arg(long, env = "SHARD_READY_TIMEOUT", default_value_t = 600)]
    pub shard_ready_timeout: u64,

    /// Seconds a running shard may go without answering its health check (probed every
    /// second, answered off the compute threads, so a long step does not delay it) before it
    /// is taken for hung: it is killed and the deployment stops with an error naming it.
    #[arg(long, env = "SHARD_HEALTH_TIMEOUT", default_value_t = 30)]
    pub shard_health_timeout: u64,
}

/// `--quantize` values (the shard's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Quantize {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4k", alias = "q4_k")]
    Q4K,
}

impl Quantize {
    pub fn as_arg(self) -> &'static str {
        match self {
            Quantize::Q8_0 => "q8_0",
            Quantize::Q4_0 => "q4_0",
            Quantize::Q4K => "q4k",
        }
    }
}

/// `--cpu-kernels` values (the shard's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CpuKernels {
    Auto,
    Avx512,
    Avx2,
    Scalar,
}

impl CpuKernels {
    pub fn as_arg(self) -> &'static str {
        match self {
            CpuKernels::Auto => "auto",
            CpuKernels::Avx512 => "avx512",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Scalar => "scalar",
        }
    }
}

/// `--activation-outliers` values (the shard's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActivationOutliers {
    Refine,
    Plain,
}

impl ActivationOutliers {
    pub fn as_arg(self) -> &'static str {
        match self {
            ActivationOutliers::Refine => "refine",
            ActivationOutliers::Plain => "plain",
        }
    }
}

/// `--kv-cache-dtype` values (the shard's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvCacheDtype {
    Auto,
    #[value(alias = "fp16", alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "fp32", alias = "float32")]
    F32,
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
}

impl KvCacheDtype {
    pub fn as_arg(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::F32 => "f32",
            KvCacheDtype::Q8_0 => "q8_0",
        }
    }
}

/// `--dtype` values (the shard's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Float32,
    Float16,
    Bfloat16,
}

impl Dtype {
    pub fn as_arg(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
        }
    }
}

impl Args {
    /// Checks what clap cannot: combinations of flags. Run before anything is downloaded or
    /// started, so a bad command line fails in a second with one clear line.
    pub fn validate(&self) -> Result<()> {
        if self.num_shard == 0 {
            bail!("--num-shard must be at least 1");
        }
        if self
            .request_deadline
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            bail!("--request-deadline must be a positive number of seconds");
        }
        if self.shard_health_timeout == 0 {
            bail!("--shard-health-timeout must be at least 1 second");
        }
        if !(self.collective_timeout.is_finite() && self.collective_timeout > 0.0) {
            bail!("--collective-timeout must be a positive number of seconds");
        }
        if self.validation_workers == 0 {
            bail!("--validation-workers must be > 0");
        }
        if self.max_concurrent_requests == 0 {
            bail!("--max-concurrent-requests must be > 0");
        }
        if self.max_client_batch_size == 0 {
            bail!("--max-client-batch-size must be > 0");
        }
        if self.shard_threads == Some(0) {
            bail!("--shard-threads must be > 0");
        }
        if self.kv_cache_memory == 0 {
            bail!("--kv-cache-memory must be > 0");
        }
        if let (Some(input), Some(total)) = (self.max_input_tokens, self.max_total_tokens) {
            if input >= total {
                bail!("`max_input_tokens` must be < `max_total_tokens` (got {input} and {total})");
            }
        }
        if let (Some(total), Some(batch_total)) =
            (self.max_total_tokens, self.max_batch_total_tokens)
        {
            if total as u64 > u64::from(batch_total) {
                bail!("`max_total_tokens` must be <= `max_batch_total_tokens` (got {total} and {batch_total})");
            }
        }
        if !(self.waiting_served_ratio >= 0.0 && self.waiting_served_ratio.is_finite()) {
            bail!("--waiting-served-ratio must be a non-negative number");
        }
        Ok(())
    }

    pub fn graceful_termination_timeout(&self) -> Duration {
        Duration::from_secs(self.graceful_termination_timeout)
    }

    pub fn shard_ready_timeout(&self) -> Duration {
        Duration::from_secs(self.shard_ready_timeout)
    }

    pub fn shard_health_timeout(&self) -> Duration {
        Duration::from_secs(self.shard_health_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["wick", "--model-id", "m"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_follow_tgi() {
        let args = parse(&[]);
        assert_eq!(args.num_shard, 1);
        assert_eq!(args.max_concurrent_requests, 128);
        assert_eq!(args.waiting_served_ratio, 0.3);
        assert_eq!(args.max_waiting_tokens, 20);
        assert_eq!(args.payload_limit, 2_000_000);
        assert_eq!(args.graceful_termination_timeout(), Duration::from_secs(90));
        assert_eq!(args.kv_cache_memory, 2 << 30);
        assert_eq!(args.shard_uds_path, PathBuf::from("/tmp/wick-server"));
        assert!(args.validate().is_ok());
    }

    #[test]
    fn repeatable_and_enum_flags_parse() {
        let args = parse(&[
            "--cors-allow-origin",
            "http://a",
            "--cors-allow-origin",
            "http://b",
            "--quantize",
            "q4k",
            "--dtype",
            "float16",
            "--kv-cache-memory",
            "512MiB",
        ]);
        assert_eq!(args.cors_allow_origin, ["http://a", "http://b"]);
        assert_eq!(args.quantize, Some(Quantize::Q4K));
        assert_eq!(
            parse(&["--quantize", "q4_k"]).quantize,
            Some(Quantize::Q4K),
            "llama.cpp's spelling"
        );
        assert_eq!(args.dtype, Some(Dtype::Float16));
        assert_eq!(args.kv_cache_memory, 512 << 20);
    }

    #[test]
    fn bad_combinations_are_rejected() {
        let err = |extra: &[&str]| parse(extra).validate().unwrap_err().to_string();
        assert!(
            err(&["--max-input-tokens", "10", "--max-total-tokens", "10"])
                .contains("max_input_tokens")
        );
        assert!(parse(&["--num-shard", "2"]).validate().is_ok());
        assert!(err(&["--collective-timeout", "0"]).contains("collective-timeout"));
        assert!(err(&["--num-shard", "0"]).contains("at least 1"));
        assert!(err(&["--validation-workers", "0"]).contains("validation-workers"));
        assert!(err(&[
            "--max-total-tokens",
            "100",
            "--max-batch-total-tokens",
            "50"
        ])
        .contains("max_batch_total_tokens"));
        assert!(
            parse(&["--max-input-tokens", "9", "--max-total-tokens", "10"])
                .validate()
                .is_ok()
        );
    }
}
