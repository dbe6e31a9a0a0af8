//! `wick-bench serve`: loads any OpenAI-compatible server with streaming requests, level by
//! level — a fixed number of requests in flight (closed loop) or Poisson arrivals at a fixed
//! rate (open loop) — and measures what each stream sees.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use crate::arrivals::poisson_arrivals;
use crate::openai::{self, Endpoint, RequestTemplate, StreamItem, TokenCounts};
use crate::prompts::{self, PromptSource};
use crate::report::{
    LevelResult, RequestRecord, ServeParameters, ServeReport, TokenSource, SERVE_KIND,
};
use crate::run_info::RunInfo;
use crate::sse::SseDecoder;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Base URL of the server; `/v1/...` is appended (a trailing `/v1` is accepted too).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// Which route to load.
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// Model name sent with each request; by default the first model of `GET /v1/models`.
    #[arg(long)]
    pub model: Option<String>,
    /// Closed-loop levels: requests kept in flight (repeat the flag or separate with commas).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16, 32])]
    pub concurrency: Vec<u32>,
    /// Open-loop levels instead of concurrency: Poisson arrivals, requests per second.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub request_rate: Vec<f64>,
    /// How long each level sends requests (`30s`, `500ms`, `2m`); in-flight requests are
    /// awaited. The default when `--requests` is not given.
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Requests per level, instead of a duration.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Approximate prompt length, in tokens, of prompts cut from the built-in corpus.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate per request (`max_tokens`).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Prompts from a file instead of the corpus: one per line, plain text or JSONL.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Send `ignore_eos: true` so that every request generates `--max-tokens` tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature; the server's default when absent.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Bearer token for the server.
    #[arg(long, env = "WICK_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Unmeasured requests sent one by one before the first level; a failure stops the run.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seed of the arrival times and of the prompts' corpus offsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A request still streaming after this long fails.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub request_timeout: Duration,
    /// Draw output throughput against per-stream speed across levels into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

const DEFAULT_DURATION: Duration = Duration::from_secs(30);

/// `30s`, `1.5s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 30s, 500ms or 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// When a level stops sending.
#[derive(Debug, Clone, Copy)]
enum Stop {
    After(usize),
    At(Instant),
}

impl Stop {
    fn reached(self, sent: usize) -> bool {
        match self {
            Stop::After(n) => sent >= n,
            Stop::At(deadline) => Instant::now() >= deadline,
        }
    }
}

/// One load level.
#[derive(Debug, Clone, Copy)]
enum Level {
    Concurrency(u32),
    Rate(f64),
}

impl Level {
    fn label(self) -> String {
        match self {
            Level::Concurrency(c) => format!("c={c}"),
            Level::Rate(r) => format!("rate={r}"),
        }
    }
}

/// Sends streaming requests and times them.
struct Client {
    http: reqwest::Client,
    url: String,
    template: RequestTemplate,
    api_key: Option<String>,
    prompts: PromptSource,
}

impl Client {
    async fn send(&self, index: usize) -> RequestRecord {
        let prompt = self.prompts.prompt(index);
        let mut record = RequestRecord::default();
        let start = Instant::now();
        if let Err(e) = self.stream(&prompt, start, &mut record).await {
            record.error = Some(openai::clip(&format!("{e:#}")));
        }
        record.e2e_s = start.elapsed().as_secs_f64();
        if record.prompt_source.is_none() {
            record.prompt_tokens = self.prompts.approximate_tokens(index);
            record.prompt_source = Some(TokenSource::Estimated);
        }
        record
    }

    /// Fills `record` as the stream goes; an error return is the request's failure.
    async fn stream(
        &self,
        prompt: &str,
        start: Instant,
        record: &mut RequestRecord,
    ) -> anyhow::Result<()> {
        let mut request = self.http.post(&self.url).json(&self.template.body(prompt));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(without_url)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").map(openai::error_message))
                .unwrap_or_else(|| openai::clip(body.trim()));
            bail!("HTTP {}: {message}", status.as_u16());
        }

        let mut decoder = SseDecoder::new();
        let mut body = response.bytes_stream();
        let mut state = StreamState::default();
        let mut on_event = |event: Option<&str>, data: &str| -> anyhow::Result<bool> {
            match openai::interpret(event, data) {
                StreamItem::Done => return Ok(true),
                StreamItem::Error(e) => bail!("error in stream: {e}"),
                StreamItem::Chunk(chunk) => {
                    if chunk.has_text {
                        let now = start.elapsed().as_secs_f64();
                        match record.last_token_s {
                            None => record.ttft_s = Some(now),
                            Some(last) => record.itl_s.push(now - last),
                        }
                        record.last_token_s = Some(now);
                        state.text_chunks += 1;
                    }
                    state.finished |= chunk.finished;
                    state.usage = chunk.usage.or(state.usage);
                    state.timings = chunk.timings.or(state.timings);
                }
            }
            Ok(false)
        };
        let mut done = false;
        'read: while let Some(bytes) = body.next().await {
            for event in decoder.push(&bytes.map_err(without_url)?) {
                if on_event(event.event.as_deref(), &event.data)? {
                    done = true;
                    break 'read;
                }
            }
        }
        if !done {
            if let Some(event) = decoder.finish() {
                done = on_event(event.event.as_deref(), &event.data)?;
            }
        }
        // A stream cut short without `[DONE]` and without a finish reason did not complete.
        if !done && !state.finished {
            bail!("stream ended before [DONE]");
        }
        state.resolve(record);
        Ok(())
    }
}

/// What a stream told about the request as a whole.
#[derive(Debug, Default)]
struct StreamState {
    text_chunks: u64,
    finished: bool,
    usage: Option<TokenCounts>,
    timings: Option<TokenCounts>,
}

impl StreamState {
    /// Token counts: the server's usage first, llama.cpp's timings next; content chunks only
    /// when the server told nothing. A missing prompt count is left for the caller to estimate.
    fn resolve(&self, record: &mut RequestRecord) {
        let reported = |pick: fn(&TokenCounts) -> Option<u64>| {
            let from = |counts: Option<TokenCounts>, source| {
                counts.as_ref().and_then(pick).map(|n| (n, source))
            };
            from(self.usage, TokenSource::Usage).or(from(self.timings, TokenSource::Timings))
        };
        let (completion, source) =
            reported(|c| c.completion).unwrap_or((self.text_chunks, TokenSource::Estimated));
        record.completion_tokens = completion;
        record.completion_source = Some(source);
        if let Some((prompt, source)) = reported(|c| c.prompt) {
            record.prompt_tokens = prompt;
            record.prompt_source = Some(source);
        }
    }
}

/// reqwest repeats the URL in every error; the report groups errors by message, so drop it.
fn without_url(e: reqwest::Error) -> anyhow::Error {
    anyhow::Error::new(e.without_url())
}

/// `http://host:port`, `http://host:port/` and `http://host:port/v1` all name the same server.
fn base_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url).to_string()
}

/// The first model the server lists, for servers that insist on a correct `model`.
async fn discover_model(http: &reqwest::Client, base: &str, key: Option<&str>) -> Option<String> {
    let mut request = http.get(format!("{base}/v1/models"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let models: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
    models["data"][0]["id"].as_str().map(str::to_string)
}

fn progress_bar(level: Level, stop: Stop, levels: usize, index: usize) -> ProgressBar {
    let (len, unit) = match stop {
        Stop::After(n) => (n as u64, "requests"),
        Stop::At(deadline) => (
            deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "ms",
        ),
    };
    let bar = ProgressBar::new(len);
    let template = format!(
        "[{}/{levels}] {{prefix:>9}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{msg}}",
        index + 1
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.set_prefix(level.label());
    bar
}

/// Tallies finished requests onto the progress bar.
#[derive(Clone)]
struct Progress {
    bar: ProgressBar,
    counts_requests: bool,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Progress {
    fn finished(&self, record: &RequestRecord) {
        let counter = if record.error.is_some() {
            &self.failed
        } else {
            &self.ok
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.counts_requests {
            self.bar.inc(1);
        }
        self.bar.set_message(format!(
            "ok {} failed {}",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        ));
    }
}

async fn run_level(
    client: &Arc<Client>,
    level: Level,
    stop: Stop,
    first_index: usize,
    seed: u64,
    progress: &Progress,
) -> anyhow::Result<Vec<RequestRecord>> {
    let mut tasks = JoinSet::new();
    match level {
        Level::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..c {
                let (client, next, progress) = (client.clone(), next.clone(), progress.clone());
                tasks.spawn(async move {
                    let mut records = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if stop.reached(i) {
                            break records;
                        }
                        let record = client.send(first_index + i).await;
                        progress.finished(&record);
                        records.push(record);
                    }
                });
            }
        }
        Level::Rate(rate) => {
            let start = tokio::time::Instant::now();
            for (i, at) in poisson_arrivals(rate, seed).enumerate() {
                let due = start + Duration::from_secs_f64(at);
                if stop.reached(i) || matches!(stop, Stop::At(d) if due.into_std() >= d) {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let (client, progress) = (client.clone(), progress.clone());
                tasks.spawn(async move {
                    let record = client.send(first_index + i).await;
                    progress.finished(&record);
                    vec![record]
                });
            }
        }
    }
    let mut records = Vec::new();
    while let Some(done) = tasks.join_next().await {
        records.extend(done.context("a request task panicked")?);
    }
    Ok(records)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ServeReport> {
    if args
        .request_rate
        .iter()
        .any(|&r| !(r > 0.0 && r.is_finite()))
    {
        bail!("request rates must be positive");
    }
    if args.concurrency.contains(&0) {
        bail!("concurrency must be positive");
    }
    let levels: Vec<Level> = if args.request_rate.is_empty() {
        args.concurrency
            .iter()
            .map(|&c| Level::Concurrency(c))
            .collect()
    } else {
        args.request_rate.iter().map(|&r| Level::Rate(r)).collect()
    };
    let duration = match args.requests {
        Some(_) => None,
        None => Some(args.duration.unwrap_or(DEFAULT_DURATION)),
    };
    let prompts = match &args.prompts {
        Some(path) => PromptSource::File(prompts::load_file(path)?),
        None => PromptSource::Corpus {
            tokens: args.prompt_tokens,
            seed: args.seed,
        },
    };

    let http = reqwest::Client::builder()
        .timeout(args.request_timeout)
        .tcp_nodelay(true)
        .build()?;
    let base = base_url(&args.url);
    let model = match &args.model {
        Some(model) => model.clone(),
        None => discover_model(&http, &base, args.api_key.as_deref())
            .await
            .unwrap_or_else(|| {
                eprintln!("GET {base}/v1/models named no model; sending `default` (see --model)");
                "default".to_string()
            }),
    };
    let client = Arc::new(Client {
        http,
        url: format!("{base}{}", args.endpoint.path()),
        template: RequestTemplate {
            endpoint: args.endpoint,
            model: model.clone(),
            max_tokens: args.max_tokens,
            ignore_eos: args.ignore_eos,
            temperature: args.temperature,
        },
        api_key: args.api_key.clone(),
        prompts,
    });

    let mut next_index = 0;
    for _ in 0..args.warmup {
        let record = client.send(next_index).await;
        next_index += 1;
        if let Some(e) = record.error {
            bail!("warmup request to {} failed: {e}", client.url);
        }
    }

    let mut results = Vec::new();
    for (n, &level) in levels.iter().enumerate() {
        let start = Instant::now();
        let stop = match duration {
            Some(d) => Stop::At(start + d),
            None => Stop::After(args.requests.unwrap_or(0)),
        };
        let bar = progress_bar(level, stop, levels.len(), n);
        let progress = Progress {
            bar: bar.clone(),
            counts_requests: matches!(stop, Stop::After(_)),
            ok: Arc::default(),
            failed: Arc::default(),
        };
        // In duration mode the bar shows the time spent; the requests tally is its message.
        let ticker = duration.map(|d| {
            let bar = bar.clone();
            tokio::spawn(async move {
                loop {
                    bar.set_position(start.elapsed().min(d).as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        let records = run_level(
            &client,
            level,
            stop,
            next_index,
            args.seed + n as u64,
            &progress,
        )
        .await?;
        if let Some(ticker) = ticker {
            ticker.abort();
        }
        bar.finish();
        next_index += records.len();
        let (concurrency, rate) = match level {
            Level::Concurrency(c) => (Some(c), None),
            Level::Rate(r) => (None, Some(r)),
        };
        let elapsed = start.elapsed().as_secs_f64();
        results.push(LevelResult::from_records(
            level.label(),
            concurrency,
            rate,
            &records,
            elapsed,
        ));
    }

    Ok(ServeReport {
        kind: SERVE_KIND.to_string(),
        model,
        server_url: base,
        endpoint: args.endpoint,
        parameters: ServeParameters {
            concurrency: if args.request_rate.is_empty() {
                args.concurrency.clone()
            } else {
                vec![]
            },
            request_rates: args.request_rate.clone(),
            duration_s: duration.map(|d| d.as_secs_f64()),
            requests_per_level: args.requests,
            prompt_tokens: args.prompts.is_none().then_some(args.prompt_tokens),
            prompts_file: args.prompts.as_ref().map(|p| p.display().to_string()),
            max_tokens: args.max_tokens,
            ignore_eos: args.ignore_eos,
            temperature: args.temperature,
            warmup_requests: args.warmup,
            seed: args.seed,
        },
        run: RunInfo::collect(),
        levels: results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).unwrap();
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("30"), Duration::from_secs(30));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("2m"), Duration::from_secs(120));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn base_urls() {
        for url in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            assert_eq!(base_url(url), "http://h:1", "{url}");
        }
    }

    #[test]
    fn token_counts_prefer_usage_then_timings_then_chunks() {
        let counts = |p, c| {
            Some(TokenCounts {
                prompt: p,
                completion: c,
            })
        };
        let mut state = StreamState {
            text_chunks: 9,
            finished: true,
            usage: counts(Some(4), Some(8)),
            timings: counts(Some(1), Some(7)),
        };
        let mut r = RequestRecord::default();
        state.resolve(&mut r);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (4, 8));
        assert_eq!(r.completion_source, Some(TokenSource::Usage));

        state.usage = None;
        let mut r = RequestRecord::default();
        state.resolve(&mut r);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (1, 7));
        assert_eq!(r.prompt_source, Some(TokenSource::Timings));

        state.timings = None;
        let mut r = RequestRecord::default();
        state.resolve(&mut r);
        assert_eq!(r.completion_tokens, 9);
        assert_eq!(r.completion_source, Some(TokenSource::Estimated));
        assert_eq!(r.prompt_source, None, "left for the caller to estimate");
    }
}
