//! `wick`: one command to serve a model. It checks the flags, resolves the model (downloading a
//! Hub id once), starts `wick-shard` processes and waits until each answers gRPC Health, starts
//! `wick-router`, re-emits their logs, and supervises them: any child dying brings everything
//! down with a non-zero exit; SIGINT/SIGTERM stop the router, then the shards.

mod args;
mod child;
mod fleet;
mod logs;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Args;
use crate::fleet::{Fleet, Signals, Stop};

fn main() -> ExitCode {
    let args = Args::parse();
    logs::init(args.json_output);
    if let Err(e) = args.validate() {
        tracing::error!("{e:#}");
        return ExitCode::FAILURE;
    }
    // Resolve (and download) before any child starts, so shards load from local disk and a bad
    // model id fails here, once, clearly.
    let model = match wick_model::resolve(
        &args.model_id,
        args.revision.as_deref(),
        args.huggingface_hub_cache.clone(),
        args.offline,
    ) {
        Ok(model) => model,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    // A model that cannot be split over the shards fails here, before any shard starts.
    if let Err(e) = model.config.check_split(args.num_shard) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    tracing::info!(
        model_id = args.model_id.as_str(),
        path = %model.path().display(),
        architecture = ?model.config.architecture,
        "model resolved"
    );
    // One thread: children are spawned from it (their parent-death signal is tied to the
    // spawning thread), and supervision is only waiting on pipes, timers and signals.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Children may run from another folder one day; give them a path that does not depend on
    // the launcher's working directory.
    let model_path =
        std::fs::canonicalize(model.path()).unwrap_or_else(|_| model.path().to_path_buf());
    runtime.block_on(serve(args, model_path))
}

async fn serve(args: Args, model_path: std::path::PathBuf) -> ExitCode {
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot listen for signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut fleet = Fleet::default();
    let stop = fleet.run(&args, &model_path, &mut signals).await;
    let code = match &stop {
        Stop::Signal(name) => {
            tracing::info!("{name} received: shutting down");
            ExitCode::SUCCESS
        }
        Stop::ChildDied { name, status, tail } => {
            tracing::error!("{name} exited unexpectedly ({status}); shutting down");
            if !tail.is_empty() {
                tracing::error!("last output of {name}:\n{}", tail.join("\n"));
            }
            ExitCode::FAILURE
        }
        Stop::Hung { name, silent } => {
            tracing::error!(
                "{name} did not answer its health check for {:.1}s (hung); it was killed, shutting down",
                silent.as_secs_f64()
            );
            ExitCode::FAILURE
        }
        Stop::Failed(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    fleet
        .shutdown(args.graceful_termination_timeout(), &mut signals)
        .await;
    if let Stop::ChildDied { name, .. } | Stop::Hung { name, .. } = &stop {
        tracing::error!("{name} failed; every process is stopped");
    } else {
        tracing::info!("every process is stopped");
    }
    code
}
