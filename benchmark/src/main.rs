//! `wick-bench`: how fast wick is, measured.

mod arrivals;
mod attention;
mod compare;
mod kernels;
mod model_gen;
mod openai;
mod plot;
mod prompts;
mod report;
mod run_info;
mod serve;
mod shard;
mod sse;
mod stats;
mod stress;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "wick-bench",
    version,
    about = "Latency and throughput of wick shards and of OpenAI-compatible servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Also write every figure and the run's parameters as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill and decode speed of running shards, over gRPC, per batch size.
    Shard(shard::ShardArgs),
    /// Load an OpenAI-compatible server with streaming requests, level by level.
    Serve(serve::ServeArgs),
    /// The linear-layer kernels alone: GEMV GB/s and GEMM GOP/s by format, shape and rows.
    Kernels(kernels::KernelArgs),
    /// The decode attention kernel alone: µs per layer and KV GB/s by batch, context and KV
    /// cache type.
    Attention(attention::AttentionArgs),
    /// A real `wick` under load, faults and hostile input: one line of figures per scenario
    /// (exits non-zero when a scenario finds a problem).
    Stress(stress::StressArgs),
    /// Write a random-weight GGUF of a real model's shape (e.g. Llama-3.2-1B) with another
    /// GGUF's tokenizer, loadable by wick and llama.cpp alike.
    MakeModel(model_gen::MakeModelArgs),
    /// Ratios B/A, level by level, of two `serve --json` reports.
    Compare {
        /// The baseline report.
        a: PathBuf,
        /// The report compared with it.
        b: PathBuf,
    },
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Shard(args) => {
            let report = shard::run(args).await?;
            println!("{}", shard::markdown(&report));
            if let Some(path) = cli.json {
                write_json(&path, &report)?;
            }
        }
        Command::Serve(args) => {
            let plot = args.plot.clone();
            let report = serve::run(args).await?;
            println!("{}", report::markdown(&report));
            if let Some(path) = cli.json {
                write_json(&path, &report)?;
            }
            if let Some(path) = plot {
                std::fs::write(&path, plot::svg(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        Command::Kernels(args) => {
            let report = kernels::run(args)?;
            println!("{}", kernels::markdown(&report));
            if let Some(path) = cli.json {
                write_json(&path, &report)?;
            }
        }
        Command::Attention(args) => {
            let report = attention::run(args)?;
            println!("{}", attention::markdown(&report));
            if let Some(path) = cli.json {
                write_json(&path, &report)?;
            }
        }
        Command::Stress(args) => {
            let report = stress::run(args).await?;
            if let Some(path) = cli.json {
                write_json(&path, &report)?;
            }
            anyhow::ensure!(report.ok(), "a stress scenario found problems (see above)");
        }
        Command::MakeModel(args) => model_gen::run(args)?,
        Command::Compare { a, b } => {
            println!(
                "{}",
                compare::markdown(&compare::load(&a)?, &compare::load(&b)?)
            );
        }
    }
    Ok(())
}
