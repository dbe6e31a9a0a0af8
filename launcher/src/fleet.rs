//! The deployment: the shards' and the router's command lines, startup in order (shards, wait
//! until each answers gRPC Health, then the router), supervision, and shutdown in reverse.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::args::Args;
use crate::child::{locate_binary, ManagedChild};

/// How often children are polled for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the launcher says it is still waiting for a shard.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// One health probe's budget: a loading shard has no socket yet, a ready one answers at once.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often running shards are probed for liveness.
const HEALTH_WATCH_INTERVAL: Duration = Duration::from_secs(1);

pub const SHARD_BINARY: &str = "wick-shard";
pub const ROUTER_BINARY: &str = "wick-router";

fn push(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

fn push_opt<T: ToString>(args: &mut Vec<OsString>, flag: &str, value: Option<T>) {
    if let Some(value) = value {
        push(args, flag, value.to_string());
    }
}

/// `wick-shard serve …` for `rank`, loading the already resolved local `model_path`.
pub fn shard_args(args: &Args, model_path: &Path, rank: usize) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["serve".into()];
    push(&mut out, "--model-id", model_path);
    push(&mut out, "--uds-path", &args.shard_uds_path);
    push(&mut out, "--rank", rank.to_string());
    push(&mut out, "--world-size", args.num_shard.to_string());
    if args.num_shard > 1 {
        let mut rendezvous = args.shard_uds_path.as_os_str().to_owned();
        rendezvous.push("-tp");
        push(&mut out, "--master-addr", rendezvous);
        push(
            &mut out,
            "--collective-timeout",
            args.collective_timeout.to_string(),
        );
    }
    push_opt(&mut out, "--dtype", args.dtype.map(|d| d.as_arg()));
    push_opt(&mut out, "--quantize", args.quantize.map(|q| q.as_arg()));
    push_opt(
        &mut out,
        "--cpu-kernels",
        args.cpu_kernels.map(|k| k.as_arg()),
    );
    push_opt(
        &mut out,
        "--activation-outliers",
        args.activation_outliers.map(|o| o.as_arg()),
    );
    push_opt(
        &mut out,
        "--kv-cache-dtype",
        args.kv_cache_dtype.map(|d| d.as_arg()),
    );
    push(
        &mut out,
        "--kv-cache-memory",
        args.kv_cache_memory.to_string(),
    );
    push(&mut out, "--threads", shard_threads(args).to_string());
    // Always JSON: the launcher parses the level of every line.
    out.push("--json-output".into());
    out
}

/// Compute threads of each shard: `--shard-threads`, else the cores shared among the shards
/// (tensor-parallel ranks on one host would otherwise fight over the same cores).
pub fn shard_threads(args: &Args) -> usize {
    args.shard_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / args.num_shard.max(1)).max(1)
    })
}

/// `wick-router …` with the launcher's serving flags.
pub fn router_args(args: &Args) -> Vec<OsString> {
    let mut out = Vec::new();
    push(
        &mut out,
        "--master-shard-uds-path",
        wick_proto::rank_socket(&args.shard_uds_path, 0),
    );
    push(&mut out, "--model-id", &args.model_id);
    push(
        &mut out,
        "--max-concurrent-requests",
        args.max_concurrent_requests.to_string(),
    );
    push(&mut out, "--max-best-of", args.max_best_of.to_string());
    push(
        &mut out,
        "--max-stop-sequences",
        args.max_stop_sequences.to_string(),
    );
    push(
        &mut out,
        "--max-top-n-tokens",
        args.max_top_n_tokens.to_string(),
    );
    push_opt(&mut out, "--max-input-tokens", args.max_input_tokens);
    push_opt(&mut out, "--max-total-tokens", args.max_total_tokens);
    push(
        &mut out,
        "--waiting-served-ratio",
        args.waiting_served_ratio.to_string(),
    );
    push_opt(
        &mut out,
        "--max-batch-prefill-tokens",
        args.max_batch_prefill_tokens,
    );
    push_opt(
        &mut out,
        "--max-batch-total-tokens",
        args.max_batch_total_tokens,
    );
    push(
        &mut out,
        "--max-waiting-tokens",
        args.max_waiting_tokens.to_string(),
    );
    push_opt(&mut out, "--max-batch-size", args.max_batch_size);
    push(
        &mut out,
        "--max-client-batch-size",
        args.max_client_batch_size.to_string(),
    );
    push(
        &mut out,
        "--validation-workers",
        args.validation_workers.to_string(),
    );
    push(&mut out, "--hostname", &args.hostname);
    push(&mut out, "--port", args.port.to_string());
    for origin in &args.cors_allow_origin {
        push(&mut out, "--cors-allow-origin", origin);
    }
    push(&mut out, "--payload-limit", args.payload_limit.to_string());
    push_opt(&mut out, "--request-deadline", args.request_deadline);
    if let Some(endpoint) = &args.otlp_endpoint {
        push(&mut out, "--otlp-endpoint", endpoint);
        push(&mut out, "--otlp-service-name", &args.otlp_service_name);
    }
    out.push("--json-output".into());
    out
}

/// SIGINT and SIGTERM, listened to from before the first child starts.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Why the deployment stops.
#[derive(Debug)]
pub enum Stop {
    /// Asked to (exit 0 once everything is down).
    Signal(&'static str),
    /// A child exited on its own: everything goes down and the launcher fails.
    ChildDied {
        name: String,
        status: ExitStatus,
        tail: Vec<String>,
    },
    /// A running shard stopped answering its health check (stopped, deadlocked): it has been
    /// killed, and everything goes down as for a death.
    Hung { name: String, silent: Duration },
    /// Startup failed (a binary missing, a shard never ready).
    Failed(anyhow::Error),
}

/// The running children.
#[derive(Default)]
pub struct Fleet {
    shards: Vec<ManagedChild>,
    router: Option<ManagedChild>,
    sockets: Vec<PathBuf>,
}

impl Fleet {
    /// Starts the shards, waits until each is healthy, starts the router, then watches them all
    /// until a signal or a death. Returns why it stopped; the caller then runs
    /// [`Fleet::shutdown`] whatever the reason.
    pub async fn run(&mut self, args: &Args, model_path: &Path, signals: &mut Signals) -> Stop {
        let shard_binary = locate_binary(SHARD_BINARY);
        for rank in 0..args.num_shard {
            let socket = wick_proto::rank_socket(&args.shard_uds_path, rank);
            remove_socket(&socket);
            self.sockets.push(socket);
            let name = format!("shard-{rank}");
            match ManagedChild::spawn(&name, &shard_binary, shard_args(args, model_path, rank)) {
                Ok(child) => self.shards.push(child),
                Err(e) => return Stop::Failed(e),
            }
        }
        for rank in 0..args.num_shard {
            if let Some(stop) = self
                .wait_shard_ready(rank, args.shard_ready_timeout(), signals)
                .await
            {
                return stop;
            }
        }
        let router_binary = locate_binary(ROUTER_BINARY);
        let key = args.api_key.as_deref();
        match ManagedChild::spawn_with_key("router", &router_binary, router_args(args), key) {
            Ok(child) => self.router = Some(child),
            Err(e) => return Stop::Failed(e),
        }
        tracing::info!(
            "router starting; the HTTP API will listen on {}:{} once warmup is done",
            args.hostname,
            args.port
        );
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        let mut watch = HealthWatch::start(&self.sockets, args.shard_health_timeout());
        loop {
            tokio::select! {
                name = signals.recv() => return Stop::Signal(name),
                _ = tick.tick() => {
                    if let Some(stop) = self.check_children().await {
                        return stop;
                    }
                }
                Some((rank, silent)) = watch.hung.recv() => {
                    // A death found first is the better news (a dead shard also stops
                    // answering).
                    if let Some(stop) = self.check_children().await {
                        return stop;
                    }
                    // SIGKILL works on a stopped process too; the router's calls to it then
                    // fail at once and its clients get an error instead of waiting.
                    self.shards[rank].kill_now();
                    return Stop::Hung {
                        name: format!("shard-{rank}"),
                        silent,
                    };
                }
            }
        }
    }

    /// A child that has exited, if any. When several have, one killed by a signal is named
    /// first: tensor-parallel shards exit on their own when a peer dies, and the one that died
    /// is the news.
    async fn check_children(&mut self) -> Option<Stop> {
        use std::os::unix::process::ExitStatusExt;
        let mut exited: Vec<(&mut ManagedChild, std::process::ExitStatus)> = self
            .shards
            .iter_mut()
            .chain(self.router.as_mut())
            .filter_map(|child| child.try_exited().map(|status| (child, status)))
            .collect();
        let first = exited
            .iter()
            .position(|(_, status)| status.signal().is_some())
            .unwrap_or(0);
        if exited.is_empty() {
            return None;
        }
        let (child, status) = exited.swap_remove(first);
        let tail = child.drained_tail().await;
        Some(Stop::ChildDied {
            name: child.name.clone(),
            status,
            tail,
        })
    }

    /// Polls shard `rank`'s socket with gRPC Health until it answers, a child dies, a signal
    /// arrives or `timeout` passes.
    async fn wait_shard_ready(
        &mut self,
        rank: usize,
        timeout: Duration,
        signals: &mut Signals,
    ) -> Option<Stop> {
        let socket = self.sockets[rank].clone();
        let start = Instant::now();
        let mut last_log = start;
        loop {
            if let Some(stop) = self.check_children().await {
                return Some(stop);
            }
            let probe = tokio::time::timeout(HEALTH_PROBE_TIMEOUT, probe_health(&socket));
            tokio::select! {
                name = signals.recv() => return Some(Stop::Signal(name)),
                result = probe => {
                    if let Ok(Ok(())) = result {
                        tracing::info!(
                            "shard-{rank} ready in {:.1}s",
                            start.elapsed().as_secs_f32()
                        );
                        return None;
                    }
                }
            }
            if start.elapsed() >= timeout {
                return Some(Stop::Failed(anyhow!(
                    "shard-{rank} did not answer its health check on {} within {}s (raise --shard-ready-timeout for large models)",
                    socket.display(),
                    timeout.as_secs()
                )));
            }
            if last_log.elapsed() >= WAIT_LOG_INTERVAL {
                last_log = Instant::now();
                tracing::info!(
                    "waiting for shard-{rank} to be ready ({}s)...",
                    start.elapsed().as_secs()
                );
            }
            tokio::select! {
                name = signals.recv() => return Some(Stop::Signal(name)),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Router first (it drains in-flight requests), then the shards; each gets SIGTERM, `grace`,
    /// then SIGKILL. A signal during the wait kills everything at once. Sockets are removed.
    pub async fn shutdown(&mut self, grace: Duration, signals: &mut Signals) {
        let stop_all = async {
            if let Some(router) = self.router.as_mut() {
                let status = router.terminate(grace).await;
                log_exit(router, status);
            }
            for shard in self.shards.iter_mut().rev() {
                let status = shard.terminate(grace).await;
                log_exit(shard, status);
            }
        };
        let forced = tokio::select! {
            _ = stop_all => false,
            name = signals.recv() => {
                tracing::warn!("{name} received again: killing every child now");
                true
            }
        };
        if forced {
            for child in self.router.iter_mut().chain(self.shards.iter_mut()) {
                child.kill_now();
                let _ = child.terminate(Duration::ZERO).await;
            }
        }
        for socket in &self.sockets {
            remove_socket(socket);
        }
    }
}

fn log_exit(child: &ManagedChild, status: Option<ExitStatus>) {
    match status {
        Some(status) => tracing::info!("{} stopped ({status})", child.name),
        None => tracing::warn!("{}: exit status unknown", child.name),
    }
}

/// Liveness probes of the running shards, one task per shard; a shard silent for the timeout
/// is reported once on `hung`. Dropping the watch stops the probes.
struct HealthWatch {
    hung: tokio::sync::mpsc::Receiver<(usize, Duration)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HealthWatch {
    fn start(sockets: &[PathBuf], timeout: Duration) -> Self {
        let (tx, hung) = tokio::sync::mpsc::channel(sockets.len().max(1));
        let tasks = sockets
            .iter()
            .cloned()
            .enumerate()
            .map(|(rank, socket)| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut last_answer = Instant::now();
                    loop {
                        let probe = tokio::time::timeout(timeout, probe_health(&socket)).await;
                        if matches!(probe, Ok(Ok(()))) {
                            last_answer = Instant::now();
                        } else if last_answer.elapsed() >= timeout {
                            let _ = tx.send((rank, last_answer.elapsed())).await;
                            return;
                        }
                        tokio::time::sleep(HEALTH_WATCH_INTERVAL).await;
                    }
                })
            })
            .collect();
        Self { hung, tasks }
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One gRPC Health call on a shard socket.
async fn probe_health(socket: &Path) -> Result<()> {
    if !socket.exists() {
        return Err(anyhow!("no socket yet"));
    }
    let mut client = wick_proto::connect_uds(socket).await?;
    client.health(wick_proto::HealthRequest {}).await?;
    Ok(())
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!("removed socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["wick", "--model-id", "org/model"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value following `flag`, if the flag is present.
    fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).map(String::as_str)
    }

    #[test]
    fn shard_gets_the_resolved_path_and_serving_flags() {
        let a = args(&[
            "--shard-uds-path",
            "/tmp/s",
            "--quantize",
            "q8_0",
            "--shard-threads",
            "3",
            "--kv-cache-memory",
            "1MiB",
            "--cpu-kernels",
            "avx2",
            "--activation-outliers",
            "plain",
            "--kv-cache-dtype",
            "fp32",
        ]);
        let out = strings(shard_args(&a, Path::new("/models/m"), 0));
        assert_eq!(out[0], "serve");
        assert_eq!(value(&out, "--model-id"), Some("/models/m"));
        assert_eq!(value(&out, "--uds-path"), Some("/tmp/s"));
        assert_eq!(value(&out, "--rank"), Some("0"));
        assert_eq!(value(&out, "--quantize"), Some("q8_0"));
        assert_eq!(value(&out, "--threads"), Some("3"));
        assert_eq!(value(&out, "--kv-cache-memory"), Some("1048576"));
        assert_eq!(value(&out, "--cpu-kernels"), Some("avx2"));
        assert_eq!(value(&out, "--activation-outliers"), Some("plain"));
        assert_eq!(value(&out, "--kv-cache-dtype"), Some("f32"));
        assert_eq!(value(&out, "--dtype"), None);
        assert!(out.iter().any(|a| a == "--json-output"));
        // One shard needs no rendezvous.
        assert_eq!(value(&out, "--master-addr"), None);
    }

    #[test]
    fn tensor_parallel_shards_meet_and_share_the_cores() {
        let a = args(&["--shard-uds-path", "/tmp/s", "--num-shard", "2"]);
        let out = strings(shard_args(&a, Path::new("/models/m"), 1));
        assert_eq!(value(&out, "--rank"), Some("1"));
        assert_eq!(value(&out, "--world-size"), Some("2"));
        assert_eq!(value(&out, "--master-addr"), Some("/tmp/s-tp"));
        assert_eq!(value(&out, "--collective-timeout"), Some("60"));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / 2).max(1).to_string();
        assert_eq!(value(&out, "--threads"), Some(threads.as_str()));
    }

    #[test]
    fn router_flags_are_mapped() {
        let a = args(&[
            "--shard-uds-path",
            "/tmp/s",
            "--port",
            "8080",
            "--max-total-tokens",
            "512",
            "--cors-allow-origin",
            "http://a",
            "--cors-allow-origin",
            "http://b",
            "--api-key",
            "secret",
        ]);
        let out = strings(router_args(&a));
        assert_eq!(value(&out, "--master-shard-uds-path"), Some("/tmp/s-0"));
        assert_eq!(value(&out, "--model-id"), Some("org/model"));
        assert_eq!(value(&out, "--port"), Some("8080"));
        assert_eq!(value(&out, "--max-total-tokens"), Some("512"));
        assert_eq!(value(&out, "--max-input-tokens"), None);
        assert_eq!(value(&out, "--waiting-served-ratio"), Some("0.3"));
        // The key goes in the router's environment, not on its command line.
        assert_eq!(value(&out, "--api-key"), None);
        assert!(!out.iter().any(|a| a.contains("secret")));
        assert_eq!(
            out.iter().filter(|a| *a == "--cors-allow-origin").count(),
            2
        );
        let shown = crate::child::display_command(
            Path::new("wick-router"),
            &["--api-key".into(), "secret".into()],
        );
        assert!(!shown.contains("secret") && shown.contains("<redacted>"));
    }
}
