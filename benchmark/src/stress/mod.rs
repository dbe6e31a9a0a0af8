//! `wick-bench stress`: a real `wick` under load, faults and hostile input, one line of figures
//! per scenario. Each scenario starts its own deployment (on a loopback port, with a private
//! socket path), is bounded in requests and time, and stops it. A scenario that finds a
//! problem (a lost or garbled request, a 5xx, a leak, a hang, a wrong exit) says so and the
//! command exits non-zero.

mod hostile;
mod load;
mod scenarios;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::serve::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Native and OpenAI routes, streamed and not, with clients that hang up mid-stream and
    /// hostile bodies; greedy and seeded texts checked against the same request run alone;
    /// KV blocks, queue, batch and permits back to idle afterwards.
    Mixed,
    /// Clients that read their stream slowly or not at all, beside normal ones.
    Slow,
    /// Far more concurrent long requests than the KV pool holds.
    Kv,
    /// SIGTERM under load: in-flight requests finish, new ones are refused, exit 0.
    Drain,
    /// SIGKILL of the shard under load: clients get an error, wick exits non-zero naming it.
    Kill,
    /// SIGSTOP of the shard under load: the same, once the shard's health timeout passes.
    Hang,
    /// Sustained load for `--soak`: memory and descriptors flat, throughput steady.
    Soak,
}

#[derive(Args, Debug)]
pub struct StressArgs {
    /// Model to serve (`wick --model-id`).
    #[arg(long)]
    pub model_id: String,
    /// The `wick` launcher to start (default: the one next to this executable).
    #[arg(long)]
    pub wick: Option<PathBuf>,
    /// An extra `wick` argument (repeat for several), e.g. `--wick-arg=--shard-threads=2`.
    #[arg(long = "wick-arg", allow_hyphen_values = true)]
    pub wick_args: Vec<String>,
    /// Scenarios to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mixed,slow,kv,drain,kill,hang,soak"
    )]
    pub scenarios: Vec<Scenario>,
    /// Requests of the mixed scenario.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Clients at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// New tokens of the long streams the drain, kill and hang scenarios interrupt.
    #[arg(long, default_value_t = 256)]
    pub fault_tokens: u32,
    /// Share of the mixed scenario's requests whose client hangs up mid-stream.
    #[arg(long, default_value_t = 0.10)]
    pub disconnect_rate: f64,
    /// Share of the mixed scenario's requests with a hostile body.
    #[arg(long, default_value_t = 0.05)]
    pub hostile_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// After a shard is killed (or its health timeout passes), `wick` must exit within this.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub exit_within: Duration,
    /// KV pool of the KV-pressure scenario's deployment, in tokens (its `--kv-cache-memory`
    /// is set to hold about this many): small, so that the requests far outnumber it.
    #[arg(long, default_value_t = 1456)]
    pub kv_pool: u32,
    /// How long the soak scenario runs.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub soak: Duration,
    /// Largest memory growth after warmup the soak accepts (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub rss_tolerance: f64,
    /// Largest fall of throughput from the soak's first window to its last (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub throughput_tolerance: f64,
    /// The hang scenario's `wick --shard-health-timeout`, in seconds.
    #[arg(long, default_value_t = 5)]
    pub hang_timeout: u64,
    /// A request that has not ended after this long counts as lost.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

/// One scenario's figures, in the order they print, and what it found wrong.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: Scenario,
    pub figures: Vec<(String, serde_json::Value)>,
    pub problems: Vec<String>,
}

impl ScenarioReport {
    fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            figures: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn figure(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.figures.push((name.to_string(), value.into()));
    }

    /// Records `problem` unless `ok`.
    fn expect(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.problems.push(problem());
        }
    }

    /// `scenario: name value, name value, ...` and, if any, its problems.
    pub fn line(&self) -> String {
        let figures: Vec<String> = self
            .figures
            .iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(s) => format!("{name} {s}"),
                other => format!("{name} {other}"),
            })
            .collect();
        let verdict = if self.problems.is_empty() {
            "ok".to_string()
        } else {
            format!("PROBLEMS: {}", self.problems.join("; "))
        };
        format!(
            "{}: {} | {verdict}",
            serde_json::to_value(self.scenario)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            figures.join(", ")
        )
    }
}

#[derive(Debug, Serialize)]
pub struct StressReport {
    pub model_id: String,
    pub requests: usize,
    pub concurrency: usize,
    pub max_tokens: u32,
    pub scenarios: Vec<ScenarioReport>,
}

impl StressReport {
    pub fn ok(&self) -> bool {
        self.scenarios.iter().all(|s| s.problems.is_empty())
    }
}

pub async fn run(args: StressArgs) -> anyhow::Result<StressReport> {
    let wick = match &args.wick {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this executable has no folder")?
            .join("wick"),
    };
    anyhow::ensure!(
        wick.is_file(),
        "{} does not exist (pass --wick)",
        wick.display()
    );
    let mut report = StressReport {
        model_id: args.model_id.clone(),
        requests: args.requests,
        concurrency: args.concurrency,
        max_tokens: args.max_tokens,
        scenarios: Vec::new(),
    };
    for &scenario in &args.scenarios {
        let result = scenarios::run(scenario, &args, &wick).await?;
        println!("{}", result.line());
        report.scenarios.push(result);
    }
    Ok(report)
}
