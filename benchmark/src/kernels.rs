//! `wick-bench kernels`: the linear-layer kernels alone, on random weights of real shapes:
//! GEMV bandwidth against the machine's measured read bandwidth, GEMM throughput by rows.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use wick_kernels::{format, Bf16Matrix, Format, Level, Outliers, PackedMatrix, QuantizedRows};

use crate::run_info::RunInfo;

#[derive(Args, Debug)]
pub struct KernelArgs {
    /// Weight formats (q8_0, q4_0, q4_1, q4_k, q6_k); the K formats skip shapes whose input
    /// is not a multiple of 256.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q4_0,q4_1,q8_0,q4_k,q6_k"
    )]
    pub formats: Vec<String>,
    /// Matrix shapes as OUTxIN (Llama-3.2-1B's gate/up and down, SmolLM2's gate/up).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8192x2048,2048x8192,1536x576"
    )]
    pub shapes: Vec<String>,
    /// Activation rows per product.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,128")]
    pub rows: Vec<usize>,
    #[command(flatten)]
    pub setup: Setup,
    /// Activation values: `ramp` (even, no block holds an outlier) or `ffn` (products of three
    /// normal values, as a down projection's input SiLU(gate)·up: heavy tails, about one block
    /// in seven takes the outlier pass).
    #[arg(long, value_enum, default_value_t = Activations::Ramp)]
    pub activations: Activations,
}

/// How a kernel benchmark runs, shared by `kernels` and `attention`.
#[derive(Args, Debug)]
pub struct Setup {
    /// Kernel level (avx512, avx2, scalar); default: the best this CPU runs.
    #[arg(long)]
    pub level: Option<Level>,
    /// Time spent on each measurement.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Setup {
    /// The pool to measure on, its size, and the level (lowered to what the CPU has).
    pub(crate) fn start(&self) -> anyhow::Result<(rayon::ThreadPool, usize, Level)> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let level = self.level.unwrap_or_else(Level::detected).capped();
        Ok((pool, threads, level))
    }
}

/// What the benchmark's activation rows hold (see [`KernelArgs::activations`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    Ramp,
    Ffn,
}

impl Activations {
    /// `rows × k` values, the same on every run.
    fn values(self, rows: usize, k: usize) -> Vec<f32> {
        match self {
            Activations::Ramp => (0..rows * k)
                .map(|i| ((i * 31 % 257) as f32 - 128.0) / 64.0)
                .collect(),
            Activations::Ffn => {
                let mut state = 0x2545_f491_4f6c_dd1du64;
                let mut uniform = || {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
                };
                // Box-Muller: normal values, tails included.
                let mut normal = || {
                    let (u, v) = (uniform(), uniform());
                    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                };
                (0..rows * k)
                    .map(|_| normal() * normal() * normal())
                    .collect()
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct KernelReport {
    pub run: RunInfo,
    pub level: String,
    pub threads: usize,
    /// Reading a 512 MiB buffer with every thread, GB/s.
    pub read_bandwidth_gbs: f64,
    pub results: Vec<KernelResult>,
}

#[derive(Debug, Serialize)]
pub struct KernelResult {
    pub format: String,
    pub n: usize,
    pub k: usize,
    pub rows: usize,
    pub micros: f64,
    /// Packed weight bytes over the time of one product.
    pub weight_gbs: f64,
    /// `2·rows·n·k` over the time of one product.
    pub gops: f64,
    /// The share of activation blocks that took the outlier pass.
    pub refined: f64,
}

/// A weight the benchmark multiplies by.
enum Weight {
    Quantized(PackedMatrix),
    Bf16(Bf16Matrix),
}

fn parse_format(s: &str) -> anyhow::Result<Option<Format>> {
    if s == "bf16" {
        return Ok(None);
    }
    Format::ALL
        .into_iter()
        .find(|f| f.name() == s)
        .map(Some)
        .ok_or_else(|| {
            let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
            anyhow::anyhow!("unknown format {s:?} ({}, bf16)", names.join(", "))
        })
}

fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let (n, k) = s
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("shape {s:?} is not OUTxIN"))?;
    Ok((n.parse()?, k.parse()?))
}

/// Median time of `f` over about `seconds`.
pub(crate) fn time(seconds: f64, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 5 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
        if samples.len() >= 10_000 {
            break;
        }
    }
    samples.sort();
    samples[samples.len() / 2]
}

pub(crate) fn read_bandwidth(seconds: f64) -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 64 << 20];
    let t = time(seconds, || {
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0, |a, &b| a ^ b))
            .sum();
        std::hint::black_box(s);
    });
    (buf.len() * 8) as f64 / t.as_secs_f64() / 1e9
}

pub fn run(args: KernelArgs) -> anyhow::Result<KernelReport> {
    let (pool, threads, level) = args.setup.start()?;
    pool.install(|| {
        let read_bandwidth_gbs = read_bandwidth(args.setup.seconds);
        let mut results = Vec::new();
        for f in &args.formats {
            let format = parse_format(f)?;
            for shape in &args.shapes {
                let (n, k) = parse_shape(shape)?;
                if format.is_some_and(|f| !k.is_multiple_of(f.block_elems())) {
                    continue;
                }
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-4)
                    .collect();
                let weight = match format {
                    Some(format) => Weight::Quantized(
                        PackedMatrix::from_ggml(format, &format::quantize(format, &w, n, k), n, k)
                            .map_err(anyhow::Error::msg)?,
                    ),
                    None => {
                        Weight::Bf16(Bf16Matrix::from_f32(&w, n, k).map_err(anyhow::Error::msg)?)
                    }
                };
                let bytes = match &weight {
                    Weight::Quantized(p) => p.bytes(),
                    Weight::Bf16(b) => b.bytes(),
                };
                for &rows in &args.rows {
                    let x = args.activations.values(rows, k);
                    let mut out = vec![0f32; rows * n];
                    let mut xq = QuantizedRows::default();
                    let t = time(args.setup.seconds, || match &weight {
                        Weight::Quantized(packed) => {
                            xq.requantize(level, Outliers::Refine, &x, rows, k);
                            packed.matmul(&xq, level, &mut out);
                        }
                        Weight::Bf16(b) => b.matmul(&x, rows, level, &mut out),
                    });
                    let secs = t.as_secs_f64();
                    results.push(KernelResult {
                        format: f.clone(),
                        n,
                        k,
                        rows,
                        micros: secs * 1e6,
                        weight_gbs: bytes as f64 / secs / 1e9,
                        gops: 2.0 * (rows * n * k) as f64 / secs / 1e9,
                        refined: xq.refined_blocks() as f64 / (rows * k / 32) as f64,
                    });
                }
            }
        }
        Ok(KernelReport {
            run: RunInfo::collect(),
            level: level.to_string(),
            threads,
            read_bandwidth_gbs,
            results,
        })
    })
}

pub fn markdown(r: &KernelReport) -> String {
    let mut s = format!(
        "kernels at {} on {} thread(s), {}; memory read {:.1} GB/s\n\n",
        r.level, r.threads, r.run.cpu_model, r.read_bandwidth_gbs
    );
    s += "| format | out x in | rows | µs | weight GB/s | GOP/s | refined |\n|---|---|---:|---:|---:|---:|---:|\n";
    for x in &r.results {
        s += &format!(
            "| {} | {}x{} | {} | {:.1} | {:.1} | {:.1} | {:.1}% |\n",
            x.format,
            x.n,
            x.k,
            x.rows,
            x.micros,
            x.weight_gbs,
            x.gops,
            100.0 * x.refined
        );
    }
    s
}
