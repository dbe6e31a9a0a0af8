//! `wick-bench shard`: prefill and decode speed of running shards, straight over gRPC (no router),
//! per batch size, in the manner of TGI's benchmark.

use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use futures::future::try_join_all;
use serde::Serialize;
use tokenizers::Tokenizer;
use wick_proto::{
    Batch, CachedBatch, ClearCacheRequest, DecodeRequest, InfoRequest, InfoResponse,
    NextTokenChooserParameters, PrefillRequest, Request, ServiceDiscoveryRequest, ShardClient,
    StoppingCriteriaParameters,
};

use crate::run_info::RunInfo;
use crate::stats::Summary;

#[derive(Debug, Clone, Args, Serialize)]
pub struct ShardArgs {
    /// Socket of the rank-0 shard; the other ranks are found through ServiceDiscovery.
    #[arg(
        short = 'm',
        long,
        env = "MASTER_SHARD_UDS_PATH",
        default_value = "/tmp/wick-server-0"
    )]
    pub master_shard_uds_path: String,
    /// Batch sizes to measure (repeat the flag or separate with commas).
    #[arg(short = 'b', long = "batch-size", value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16, 32])]
    pub batch_sizes: Vec<u32>,
    /// Prompt tokens per request.
    #[arg(short = 's', long, default_value_t = 10)]
    pub sequence_length: u32,
    /// Tokens generated per request (EOS ignored).
    #[arg(short = 'd', long, default_value_t = 8)]
    pub decode_length: u32,
    /// Prompt tokens each request takes as already in the KV cache (as a prefix-cache hit
    /// would): decode runs at a depth of `sequence-length` tokens while the prefill computes
    /// only the rest. Their K/V are whatever the cache holds, so this measures speed, not
    /// output.
    #[arg(long, default_value_t = 0)]
    pub cached_length: u32,
    /// Measured runs per batch size.
    #[arg(short = 'r', long, default_value_t = 10)]
    pub runs: usize,
    /// Unmeasured runs per batch size, first.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub warmups: usize,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    pub do_sample: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_n_tokens: Option<u32>,
}

/// Figures of one batch size, in milliseconds and tokens/s.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    pub batch_size: u32,
    pub prefill_latency_ms: Summary,
    pub prefill_throughput: Summary,
    pub decode_token_latency_ms: Summary,
    pub decode_total_latency_ms: Summary,
    pub decode_throughput: Summary,
    /// Where a prefill's time went (mean over the measured runs).
    pub prefill_breakdown: StepBreakdown,
    /// Where a decode step's time went (mean over every measured step).
    pub decode_breakdown: StepBreakdown,
}

/// One step's time by part, in milliseconds, as the shard reports it: its forward pass split
/// into the linear layers, attention and the rest; sampling with detokenization and stop
/// checks; and what the step cost beyond the shard's own time (gRPC, this client).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct StepBreakdown {
    pub forward_ms: f64,
    pub linear_ms: f64,
    pub attention_ms: f64,
    pub other_ms: f64,
    pub sampling_ms: f64,
    pub outside_shard_ms: f64,
}

/// Sums of step parts in nanoseconds, and the steps they cover.
#[derive(Default)]
struct PartSums {
    forward: u64,
    linear: u64,
    attention: u64,
    sampling: u64,
    shard: u64,
    wall: f64,
    steps: u64,
}

impl PartSums {
    fn add(&mut self, t: &StepTimes, wall_s: f64) {
        self.forward += t.forward_ns;
        self.linear += t.linear_ns;
        self.attention += t.attention_ns;
        self.sampling += t.decode_ns;
        self.shard += t.total_ns;
        self.wall += wall_s;
        self.steps += 1;
    }

    fn mean(&self) -> StepBreakdown {
        let n = self.steps.max(1) as f64;
        let ms = |ns: u64| ns as f64 / 1e6 / n;
        StepBreakdown {
            forward_ms: ms(self.forward),
            linear_ms: ms(self.linear),
            attention_ms: ms(self.attention),
            other_ms: ms(self.forward.saturating_sub(self.linear + self.attention)),
            sampling_ms: ms(self.sampling),
            outside_shard_ms: (self.wall * 1e3 / n - ms(self.shard)).max(0.0),
        }
    }
}

/// The timings of one step, from rank 0's answer.
struct StepTimes {
    forward_ns: u64,
    linear_ns: u64,
    attention_ns: u64,
    decode_ns: u64,
    total_ns: u64,
}

/// The [`StepTimes`] of a prefill or decode response (two message types with the same fields).
macro_rules! step_times {
    ($r:expr) => {
        StepTimes {
            forward_ns: $r.forward_ns,
            linear_ns: $r.linear_ns,
            attention_ns: $r.attention_ns,
            decode_ns: $r.decode_ns,
            total_ns: $r.total_ns,
        }
    };
}

#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub parameters: ShardArgs,
    pub model_id: String,
    pub dtype: String,
    pub quantize: String,
    pub world_size: usize,
    pub run: RunInfo,
    pub results: Vec<BatchResult>,
}

/// Every rank of one model; each call goes to all of them and rank 0's answer is kept.
struct Shards(Vec<ShardClient>);

impl Shards {
    async fn connect(master: &str) -> anyhow::Result<Self> {
        let mut master_client = wick_proto::connect_uds(master)
            .await
            .with_context(|| format!("cannot connect to the shard at {master}"))?;
        let urls = master_client
            .service_discovery(ServiceDiscoveryRequest {})
            .await?
            .into_inner()
            .urls;
        let mut clients = Vec::with_capacity(urls.len());
        for url in urls {
            clients.push(wick_proto::connect_uds(&url).await?);
        }
        Ok(Self(clients))
    }

    async fn info(&mut self) -> anyhow::Result<InfoResponse> {
        Ok(self.0[0].info(InfoRequest {}).await?.into_inner())
    }

    async fn clear(&mut self) -> anyhow::Result<()> {
        try_join_all(
            self.0
                .iter_mut()
                .map(|c| c.clear_cache(ClearCacheRequest { id: None })),
        )
        .await?;
        Ok(())
    }

    async fn prefill(&mut self, batch: Batch) -> anyhow::Result<(Option<CachedBatch>, StepTimes)> {
        let calls = self.0.iter_mut().map(|c| {
            c.prefill(PrefillRequest {
                batch: Some(batch.clone()),
                cached_batch: None,
                run_ahead: false,
            })
        });
        let r = try_join_all(calls).await?.swap_remove(0).into_inner();
        Ok((r.batch, step_times!(r)))
    }

    async fn decode(
        &mut self,
        batch: CachedBatch,
    ) -> anyhow::Result<(Option<CachedBatch>, StepTimes)> {
        let calls = self.0.iter_mut().map(|c| {
            c.decode(DecodeRequest {
                batches: vec![batch.clone()],
                run_ahead: false,
            })
        });
        let r = try_join_all(calls).await?.swap_remove(0).into_inner();
        Ok((r.batch, step_times!(r)))
    }
}

const CORPUS: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor \
incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco \
laboris nisi ut aliquip ex ea commodo consequat. ";

/// The last `len` tokens of the corpus repeated, as TGI's benchmark builds its prompt.
fn prompt_ids(tokenizer: &Tokenizer, len: u32) -> anyhow::Result<Vec<u32>> {
    let text = CORPUS.repeat(len as usize / 8 + 2);
    let ids = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .get_ids()
        .to_vec();
    if ids.len() < len as usize {
        bail!("the corpus is too short for {len} tokens");
    }
    Ok(ids[ids.len() - len as usize..].to_vec())
}

pub async fn run(args: ShardArgs) -> anyhow::Result<ShardReport> {
    let mut shards = Shards::connect(&args.master_shard_uds_path).await?;
    shards.clear().await?;
    let info = shards.info().await?;
    let tokenizer = Tokenizer::from_bytes(info.tokenizer_json.as_bytes())
        .map_err(|e| anyhow::anyhow!("shard tokenizer: {e}"))?;
    let ids = prompt_ids(&tokenizer, args.sequence_length)?;
    if args.cached_length >= args.sequence_length {
        bail!(
            "--cached-length ({}) must be below --sequence-length ({})",
            args.cached_length,
            args.sequence_length
        );
    }
    let computed_length = args.sequence_length - args.cached_length;
    let parameters = NextTokenChooserParameters {
        temperature: args.temperature.unwrap_or(1.0),
        top_k: args.top_k.unwrap_or(0),
        top_p: args.top_p.unwrap_or(1.0),
        typical_p: 1.0,
        do_sample: args.do_sample,
        seed: 0,
        repetition_penalty: 1.0,
        ..Default::default()
    };

    // The router's part: each request gets its own KV blocks for its prompt and new tokens.
    let block_size = info.block_size.max(1);
    let blocks_per_request = (args.sequence_length + args.decode_length)
        .saturating_sub(1)
        .div_ceil(block_size);
    let mut batch_id = 0u64;
    let mut results = Vec::new();
    for &size in &args.batch_sizes {
        if size * blocks_per_request > info.num_blocks {
            bail!(
                "a batch of {size} requests of {} + {} tokens needs {} KV blocks; the shard \
                 holds {} (raise --kv-cache-memory)",
                args.sequence_length,
                args.decode_length,
                size * blocks_per_request,
                info.num_blocks
            );
        }
        let (mut prefill_ms, mut prefill_tps) = (Vec::new(), Vec::new());
        let (mut token_ms, mut total_ms, mut decode_tps) = (Vec::new(), Vec::new(), Vec::new());
        let (mut prefill_parts, mut decode_parts) = (PartSums::default(), PartSums::default());
        for run in 0..args.warmups + args.runs {
            batch_id += 1;
            let requests = (0..size)
                .map(|i| Request {
                    id: i as u64,
                    input_ids: ids.clone(),
                    blocks: (i * blocks_per_request..(i + 1) * blocks_per_request).collect(),
                    parameters: Some(parameters.clone()),
                    stopping_parameters: Some(StoppingCriteriaParameters {
                        max_new_tokens: args.decode_length,
                        stop_sequences: vec![],
                        ignore_eos_token: true,
                        min_new_tokens: 0,
                    }),
                    top_n_tokens: args.top_n_tokens.unwrap_or(0),
                    cache_len: args.cached_length,
                    ..Default::default()
                })
                .collect();
            let batch = Batch {
                id: batch_id,
                requests,
                size,
                max_tokens: size * (args.sequence_length + args.decode_length),
                max_blocks: 0,
            };
            let measured = run >= args.warmups;
            let start = Instant::now();
            let (mut cached, times) = shards.prefill(batch).await?;
            let prefill = start.elapsed().as_secs_f64();
            if measured {
                prefill_parts.add(&times, prefill);
            }

            let start = Instant::now();
            let mut steps = 0u32;
            while let Some(batch) = cached {
                let step_start = Instant::now();
                let (next, times) = shards.decode(batch).await?;
                if measured {
                    decode_parts.add(&times, step_start.elapsed().as_secs_f64());
                }
                cached = next;
                steps += 1;
            }
            let decode = start.elapsed().as_secs_f64();

            eprintln!(
                "batch {size:>3} run {:>2}/{}{}: prefill {:.1} ms, decode {:.1} ms/token",
                run + 1,
                args.warmups + args.runs,
                if run < args.warmups { " (warmup)" } else { "" },
                prefill * 1e3,
                decode * 1e3 / steps.max(1) as f64
            );
            if run < args.warmups {
                continue;
            }
            prefill_ms.push(prefill * 1e3);
            prefill_tps.push((size * computed_length) as f64 / prefill);
            if steps > 0 {
                token_ms.push(decode * 1e3 / steps as f64);
                total_ms.push(decode * 1e3);
                decode_tps.push((size * steps) as f64 / decode);
            }
        }
        let summary = |v: &[f64]| Summary::of(v).context("no measured run");
        results.push(BatchResult {
            batch_size: size,
            prefill_latency_ms: summary(&prefill_ms)?,
            prefill_throughput: summary(&prefill_tps)?,
            decode_token_latency_ms: summary(&token_ms)?,
            decode_total_latency_ms: summary(&total_ms)?,
            decode_throughput: summary(&decode_tps)?,
            prefill_breakdown: prefill_parts.mean(),
            decode_breakdown: decode_parts.mean(),
        });
    }
    shards.clear().await?;
    Ok(ShardReport {
        model_id: info.model_id,
        dtype: info.dtype,
        quantize: info.quantize,
        world_size: shards.0.len(),
        run: RunInfo::collect(),
        parameters: args,
        results,
    })
}

/// TGI-style markdown tables: latency (ms) and throughput (tokens/s) per batch size.
pub fn markdown(report: &ShardReport) -> String {
    let mut out = format!(
        "model `{}` ({}, {}), {} shard(s), prompt {} tokens ({} of them taken as cached), \
         decode {} tokens, {} runs\n\n",
        report.model_id,
        report.dtype,
        report.quantize,
        report.world_size,
        report.parameters.sequence_length,
        report.parameters.cached_length,
        report.parameters.decode_length,
        report.parameters.runs
    );
    out += "| step | batch | avg ms | min ms | max ms | p50 ms | p90 ms | p99 ms |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &report.results {
        for (name, s) in [
            ("Prefill", &r.prefill_latency_ms),
            ("Decode (token)", &r.decode_token_latency_ms),
            ("Decode (total)", &r.decode_total_latency_ms),
        ] {
            out += &format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                r.batch_size, s.avg, s.min, s.max, s.p50, s.p90, s.p99
            );
        }
    }
    out += "\n| step | batch | avg tokens/s | min tokens/s | max tokens/s |\n|---|---:|---:|---:|---:|\n";
    for r in &report.results {
        for (name, s) in [
            ("Prefill", &r.prefill_throughput),
            ("Decode", &r.decode_throughput),
        ] {
            out += &format!(
                "| {name} | {} | {:.1} | {:.1} | {:.1} |\n",
                r.batch_size, s.avg, s.min, s.max
            );
        }
    }
    out +=
        "\nWhere a step's time goes (mean ms per step; forward = linear + attention + other):\n\n";
    out += "| step | batch | forward | linear | attention | other | sampling | outside shard |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &report.results {
        for (name, b) in [
            ("Prefill", &r.prefill_breakdown),
            ("Decode", &r.decode_breakdown),
        ] {
            out += &format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                r.batch_size,
                b.forward_ms,
                b.linear_ms,
                b.attention_ms,
                b.other_ms,
                b.sampling_ms,
                b.outside_shard_ms
            );
        }
    }
    out
}
