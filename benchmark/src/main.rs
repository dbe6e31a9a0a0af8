//! `wick-bench`: how fast wick is, measured.

mod shard;
mod stats;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "wick-bench",
    version,
    about = "Latency and throughput of wick shards"
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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Shard(args) => {
            let report = shard::run(args).await?;
            println!("{}", shard::markdown(&report));
            if let Some(path) = cli.json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
        }
    }
    Ok(())
}
