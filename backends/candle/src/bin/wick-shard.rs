//! `wick-shard`: one model worker. It loads the model, allocates the KV cache and serves the
//! `generate.v1` gRPC protocol on the unix socket `{uds_path}-{rank}` until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use wick_backend_candle::engine::DEFAULT_BLOCK_SIZE;
use wick_backend_candle::service::{serve, ShardConfig};
use wick_backend_candle::weights::{LoadOptions, Quantize};
use wick_kernels::{KvDtype, Level, Outliers};
use wick_model::parse_bytes;

#[derive(Parser, Debug)]
#[command(
    name = "wick-shard",
    version,
    about = "wick's model shard (gRPC over a unix socket)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load a model and serve it until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The model: a Hugging Face Hub id (`org/name`), a local folder in Hub layout
    /// (`config.json`, `tokenizer.json`, `*.safetensors`) or a local `.gguf` file.
    #[arg(long, env = "MODEL_ID")]
    model_id: String,

    /// Hub revision (branch, tag or commit) when `--model-id` is a Hub id.
    #[arg(long, env = "REVISION")]
    revision: Option<String>,

    /// Base path of the unix socket; this shard listens on `{uds_path}-{rank}`.
    #[arg(long, env = "UDS_PATH", default_value = "/tmp/wick-server")]
    uds_path: PathBuf,

    /// This shard's rank in `0..world_size`.
    #[arg(long, env = "RANK", default_value_t = 0)]
    rank: u32,

    /// Number of shards the model is split over (tensor parallelism): each holds 1/N of the
    /// attention heads, MLP features and vocabulary, and all step in lock-step.
    #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
    world_size: u32,

    /// Where the tensor-parallel ranks meet: the base path of their rendezvous unix sockets
    /// (`{master_addr}-{rank}`). Default: `{uds_path}-tp`.
    #[arg(long, env = "MASTER_ADDR")]
    master_addr: Option<PathBuf>,

    /// Seconds a rank waits for the other ranks, at rendezvous and in each collective
    /// operation; a rank that takes longer is reported as hung and the shard stops.
    #[arg(long, env = "COLLECTIVE_TIMEOUT", default_value_t = 60.0)]
    collective_timeout: f64,

    /// Where the model runs: `cpu`, or `cuda` (GPU number `--rank`; needs a build with the
    /// `cuda` feature, and `nccl` for NCCL between tensor-parallel ranks).
    #[arg(long, env = "DEVICE", value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,

    /// Compute dtype of dense weights. bfloat16: dense linear weights stay (or are rounded to)
    /// bf16 and compute on wick's CPU kernels, at half the memory of float32; norms and
    /// embeddings stay float32 (on CUDA, bfloat16 falls back to float32).
    #[arg(long, env = "DTYPE", value_enum, default_value_t = DtypeArg::Float32)]
    dtype: DtypeArg,

    /// Quantize linear weights at load time: dense checkpoints, and GGUF weights stored in
    /// another format (requantized through f32). Without it GGUF weights stay as stored.
    #[arg(long, env = "QUANTIZE", value_enum)]
    quantize: Option<QuantizeArg>,

    /// The highest instruction set wick's CPU kernels use: `auto` (the best this CPU has),
    /// `avx512` (AVX-512 VNNI), `avx2` or `scalar`. Every level computes the same bits. Below
    /// `avx512` it also keeps candle's quantized kernels (Q4_K, Q6_K, ...) off AVX-512.
    #[arg(long, env = "CPU_KERNELS", value_enum, default_value_t = CpuKernelsArg::Auto)]
    cpu_kernels: CpuKernelsArg,

    /// What wick's quantized kernels do with a block of 32 activations whose largest value
    /// exceeds 4.5× the block's RMS: `refine` quantizes its rounding error again and multiplies
    /// that too (closer to the f32 path: 0.040 instead of 0.064 nats on SmolLM2); `plain`
    /// keeps every block 8-bit, as llama.cpp does (faster where activations have heavy tails).
    #[arg(long, env = "ACTIVATION_OUTLIERS", value_enum, default_value_t = OutliersArg::Refine)]
    activation_outliers: OutliersArg,

    /// Element type of the KV cache: `auto` (f16), `f16`, `bf16`, `f32` or `q8_0`. 16-bit values
    /// take half the memory and read traffic of f32; each value is rounded once, when written.
    /// `q8_0` stores blocks of 32 values as 8-bit integers with an f16 scale (1.06 bytes a
    /// value); it needs a head_dim that is a multiple of 32.
    #[arg(long, env = "KV_CACHE_DTYPE", value_enum, default_value_t = KvDtypeArg::Auto)]
    kv_cache_dtype: KvDtypeArg,

    /// Memory for the KV cache, e.g. `2GiB`, `512MiB`, `1.5GB` or plain bytes.
    #[arg(long, env = "KV_CACHE_MEMORY", default_value = "2GiB", value_parser = parse_bytes)]
    kv_cache_memory: u64,

    /// Load quantized (GGUF) linear weights as dense `--dtype` tensors.
    #[arg(long, env = "DEQUANTIZE", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    dequantize: bool,

    /// Quantized weights left to candle's generic CPU kernel, which does not get faster with more
    /// rows (Q2_K/Q3_K/Q8_K, IQ types; wick's kernels compute Q8_0, Q4_0/Q4_1, Q5_0/Q5_1 and
    /// Q4_K/Q5_K/Q6_K), also keep an f32 copy, used by steps of at least this many tokens
    /// (batched decode, prefill). 0 = never.
    #[arg(long, env = "DENSE_COPY_MIN_ROWS", default_value_t = wick_backend_candle::weights::DEFAULT_DENSE_COPY_MIN_ROWS as u32)]
    dense_copy_min_rows: u32,

    /// The f32 copies above are made only when they fit in this much memory in all.
    #[arg(long, env = "DENSE_COPY_BUDGET", default_value = "2GiB", value_parser = parse_bytes)]
    dense_copy_budget: u64,

    /// Token slots per KV cache block (the router allocates whole blocks).
    #[arg(long, env = "BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE as u32)]
    block_size: u32,

    /// Compute threads (default: every core).
    #[arg(long, env = "THREADS")]
    threads: Option<usize>,

    /// The Hugging Face Hub cache folder (default: `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    #[arg(long, env = "HUGGINGFACE_HUB_CACHE")]
    huggingface_hub_cache: Option<PathBuf>,

    /// Never reach the Hub: load from the cache only.
    #[arg(long, env = "HF_HUB_OFFLINE", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    offline: bool,

    /// Log as JSON lines (for the launcher) instead of human-readable text.
    #[arg(long, env = "JSON_OUTPUT", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    json_output: bool,

    /// Log filter: a level (`info`, `debug`) or a tracing directive (`wick_backend_candle=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    Float32,
    Float16,
    Bfloat16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum QuantizeArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4k", alias = "q4_k")]
    Q4K,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KvDtypeArg {
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutliersArg {
    Refine,
    Plain,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CpuKernelsArg {
    Auto,
    Avx512,
    Avx2,
    Scalar,
}

impl CpuKernelsArg {
    /// The level asked for, lowered to what this CPU has.
    fn level(self) -> Level {
        match self {
            CpuKernelsArg::Auto | CpuKernelsArg::Avx512 => Level::Avx512,
            CpuKernelsArg::Avx2 => Level::Avx2,
            CpuKernelsArg::Scalar => Level::Scalar,
        }
        .capped()
    }
}

fn init_logging(args: &ServeArgs) {
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if args.json_output {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// A step allocates and frees the same buffers (activations, logits) layer after layer; glibc
/// serves large ones from fresh mappings and returns them on free, so every step paid page
/// faults and the kernel's page zeroing again (a 4096-token prefill chunk of a 2048-wide model
/// holds 32 MiB tensors, past the largest threshold glibc accepts). So nothing is served from
/// its own mapping: every block comes from the heaps, and freed memory is kept for reuse up to
/// 128 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    const M_MMAP_MAX: std::ffi::c_int = -4;
    // SAFETY: mallopt only tunes the allocator; it is called before any other thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, 128 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn run(args: ServeArgs) -> anyhow::Result<()> {
    if !(args.collective_timeout.is_finite() && args.collective_timeout > 0.0) {
        anyhow::bail!("--collective-timeout must be a positive number of seconds");
    }
    let threads = args
        .threads
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // candle sizes its matmul parallelism from RAYON_NUM_THREADS, not from the global pool;
    // set it before any thread exists so both agree.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    keep_freed_memory();
    // candle 0.11's element-wise pool spins 25 000 times before it parks; on a shard whose
    // cores all run wick's kernels that spinning takes time from them between candle's ops.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let kernel_level = args.cpu_kernels.level();
    if kernel_level < Level::Avx512 {
        // candle 0.11 reads this once, at its first quantized matmul, to keep its repacked
        // kernels on 256-bit AVX2; it has no scalar switch.
        std::env::set_var("MISTRALRS_FORCE_AVX2", "1");
    }
    tracing::info!(
        cpu = wick_kernels::cpu_model(),
        features = ?wick_kernels::present_cpu_features(),
        %kernel_level,
        "CPU kernels"
    );
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot build the compute thread pool: {e}"))?;

    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda if !cfg!(feature = "cuda") => {
            anyhow::bail!("--device cuda: this wick-shard was built without the `cuda` feature")
        }
        DeviceArg::Cuda => Device::new_cuda(args.rank as usize)
            .map_err(|e| anyhow::anyhow!("cannot open CUDA device {}: {e}", args.rank))?,
    };
    let master_addr = args.master_addr.unwrap_or_else(|| {
        let mut base = args.uds_path.as_os_str().to_owned();
        base.push("-tp");
        PathBuf::from(base)
    });
    let config = ShardConfig {
        model_id: args.model_id,
        revision: args.revision,
        uds_path: args.uds_path,
        rank: args.rank,
        world_size: args.world_size,
        master_addr,
        collective_timeout: std::time::Duration::from_secs_f64(args.collective_timeout),
        hub_cache: args.huggingface_hub_cache,
        offline: args.offline,
        load: LoadOptions {
            dtype: match args.dtype {
                DtypeArg::Float32 => DType::F32,
                DtypeArg::Float16 => DType::F16,
                DtypeArg::Bfloat16 => DType::BF16,
            },
            quantize: args.quantize.map(|q| match q {
                QuantizeArg::Q8_0 => Quantize::Q8_0,
                QuantizeArg::Q4_0 => Quantize::Q4_0,
                QuantizeArg::Q4K => Quantize::Q4K,
            }),
            device,
            dequantize: args.dequantize,
            dense_copy_min_rows: (args.dense_copy_min_rows > 0)
                .then_some(args.dense_copy_min_rows as usize),
            dense_copy_budget: usize::try_from(args.dense_copy_budget).unwrap_or(usize::MAX),
            kernel_level,
            activation_outliers: match args.activation_outliers {
                OutliersArg::Refine => Outliers::Refine,
                OutliersArg::Plain => Outliers::Plain,
            },
        },
        kv_cache_bytes: usize::try_from(args.kv_cache_memory).unwrap_or(usize::MAX),
        kv_cache_dtype: match args.kv_cache_dtype {
            KvDtypeArg::Auto => KvDtype::default(),
            KvDtypeArg::F16 => KvDtype::F16,
            KvDtypeArg::Bf16 => KvDtype::Bf16,
            KvDtypeArg::F32 => KvDtype::F32,
            KvDtypeArg::Q8_0 => KvDtype::Q8_0,
        },
        block_size: args.block_size as usize,
    };
    tracing::info!(threads, ?config, "starting shard");
    // The runtime only does I/O; compute runs on the engine thread and rayon.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, shutdown_signal()))
}

fn main() -> ExitCode {
    let Command::Serve(args) = Cli::parse().command;
    init_logging(&args);
    match run(args) {
        Ok(()) => {
            tracing::info!("shard stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "wick-shard",
            "serve",
            "--model-id",
            "m",
            "--quantize",
            "q8_0",
            "--dtype",
            "float16",
            "--kv-cache-memory",
            "1GiB",
            "--kv-cache-dtype",
            "bfloat16",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        assert!(matches!(args.quantize, Some(QuantizeArg::Q8_0)));
        assert!(matches!(args.kv_cache_dtype, KvDtypeArg::Bf16));
        assert_eq!(args.kv_cache_memory, 1 << 30);
    }
}
