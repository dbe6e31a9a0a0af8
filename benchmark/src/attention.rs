//! `wick-bench attention`: the attention kernels alone, as a step runs them. Decode: every
//! (sequence, KV head) of a batch attends over its whole context in a paged cache, in parallel.
//! With `--chunk N`, prefill: each sequence's last `N` positions are a chunk of its prompt,
//! attended causally by the chunk kernel, one work item per (16 tokens, KV head).

use clap::Args;
use rayon::prelude::*;
use serde::Serialize;
use wick_kernels::{
    attend, attend_chunk, AttendScratch, ChunkQueries, ChunkScratch, HeadGroup, KvBuffer, KvDtype,
    KvElement, Level, PagedKv, Q8Block, CHUNK_TILE,
};

use crate::kernels::{read_bandwidth, time, Setup};
use crate::run_info::RunInfo;

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Positions each sequence attends over.
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096")]
    pub context: Vec<usize>,
    /// Sequences decoding together (the batch).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub sequences: Vec<usize>,
    /// KV cache element types (f16, bf16, f32).
    #[arg(long, value_delimiter = ',', default_value = "f16,f32")]
    pub dtypes: Vec<KvDtype>,
    /// KV heads per layer (Llama-3.2-1B: 8).
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    /// Query heads per KV head (Llama-3.2-1B: 4).
    #[arg(long, default_value_t = 4)]
    pub group: usize,
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Prefill instead of decode: each sequence's last this many positions (at most its
    /// context) are one chunk of new tokens attending causally.
    #[arg(long)]
    pub chunk: Option<usize>,
    #[command(flatten)]
    pub setup: Setup,
}

#[derive(Debug, Serialize)]
pub struct AttentionReport {
    pub run: RunInfo,
    pub level: String,
    pub threads: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Prefill chunk tokens per sequence; none for decode.
    pub chunk: Option<usize>,
    /// Reading a 512 MiB buffer with every thread, GB/s.
    pub read_bandwidth_gbs: f64,
    pub results: Vec<AttentionResult>,
}

#[derive(Debug, Serialize)]
pub struct AttentionResult {
    pub dtype: String,
    pub sequences: usize,
    pub context: usize,
    /// One layer of one step: every sequence's every KV head.
    pub micros: f64,
    /// K and V bytes of the contexts over the time (a chunk's tiles each read their window).
    pub kv_gbs: f64,
    /// Multiply-adds of the scores and the weighted sums (two flops each) over the time.
    pub gflops: f64,
}

pub fn run(args: AttentionArgs) -> anyhow::Result<AttentionReport> {
    let (pool, threads, level) = args.setup.start()?;
    anyhow::ensure!(
        args.kv_heads > 0 && args.group > 0 && args.head_dim > 0 && args.block_size > 0,
        "heads, head_dim and block_size must be positive"
    );
    pool.install(|| {
        let read_bandwidth_gbs = read_bandwidth(args.setup.seconds);
        let mut results = Vec::new();
        for &dtype in &args.dtypes {
            dtype
                .check_head_dim(args.head_dim)
                .map_err(anyhow::Error::msg)?;
            for &sequences in &args.sequences {
                for &context in &args.context {
                    anyhow::ensure!(sequences > 0 && context > 0, "empty batch or context");
                    let micros = match dtype {
                        KvDtype::F16 => step::<half::f16>(&args, level, sequences, context),
                        KvDtype::Bf16 => step::<half::bf16>(&args, level, sequences, context),
                        KvDtype::F32 => step::<f32>(&args, level, sequences, context),
                        KvDtype::Q8_0 => step::<Q8Block>(&args, level, sequences, context),
                    };
                    let bytes =
                        dtype.bytes(2 * sequences * args.kv_heads * context * args.head_dim);
                    // (query token, position) pairs each sequence attends.
                    let pairs = match args.chunk {
                        None => context,
                        Some(n) => {
                            let n = n.min(context);
                            (context - n + 1..=context).sum()
                        }
                    };
                    let heads = args.kv_heads * args.group;
                    let flops = 4 * sequences * heads * args.head_dim * pairs;
                    results.push(AttentionResult {
                        dtype: dtype.to_string(),
                        sequences,
                        context,
                        micros,
                        kv_gbs: bytes as f64 / micros / 1e3,
                        gflops: flops as f64 / micros / 1e3,
                    });
                }
            }
        }
        Ok(AttentionReport {
            run: RunInfo::collect(),
            level: level.to_string(),
            threads,
            kv_heads: args.kv_heads,
            group: args.group,
            head_dim: args.head_dim,
            block_size: args.block_size,
            chunk: args.chunk,
            read_bandwidth_gbs,
            results,
        })
    })
}

/// Bytes of KV cache a decode measurement reads in all (several layers where one is small):
/// well past a CPU's last-level cache, so the rows come from memory as in a model's step,
/// where every layer's cache is read once.
const DECODE_CACHE_BYTES: usize = 256 << 20;

/// The median µs of one layer's decode attention for `sequences` sequences of `context`
/// positions, their blocks interleaved in the cache (as the router hands them out to requests
/// that grow together). Layers follow one another, each with its own blocks, until
/// [`DECODE_CACHE_BYTES`] are read: no layer is still cached when its turn comes again.
fn step<T: KvElement>(args: &AttentionArgs, level: Level, sequences: usize, context: usize) -> f64 {
    let (hd, bs, kv_heads) = (args.head_dim, args.block_size, args.kv_heads);
    let per_seq = context.div_ceil(bs);
    let layer_blocks = per_seq * sequences;
    let layer_bytes = T::DTYPE.bytes(2 * layer_blocks * kv_heads * bs * hd);
    let layers = match args.chunk {
        Some(_) => 1,
        None => DECODE_CACHE_BYTES.div_ceil(layer_bytes.max(1)),
    };
    let blocks = layer_blocks * layers;
    let values = blocks * kv_heads * bs * hd;
    let value = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 506.0;
    // Stored a piece at a time: the caches can be hundreds of MiB.
    let stored = |shift: usize| {
        // Mapped as the shard maps its cache (on huge pages where the kernel allows).
        let mut elements = KvBuffer::<T>::zeroed(values / T::VALUES);
        let piece = 1 << 16;
        elements
            .par_chunks_mut(piece)
            .enumerate()
            .for_each(|(i, elements)| {
                let first = i * piece * T::VALUES;
                let x: Vec<f32> = (first..first + elements.len() * T::VALUES)
                    .map(|i| value(i + shift))
                    .collect();
                T::from_f32_slice(elements, &x);
            });
        elements
    };
    let (k, v) = (stored(0), stored(17));
    let tables: Vec<Vec<u32>> = (0..sequences)
        .map(|s| (0..per_seq).map(|b| (b * sequences + s) as u32).collect())
        .collect();
    // Layer `l`'s tables: the same pattern over its own blocks.
    let layer_tables: Vec<Vec<Vec<u32>>> = (0..layers)
        .map(|l| {
            let first = (l * layer_blocks) as u32;
            tables
                .iter()
                .map(|t| t.iter().map(|b| b + first).collect())
                .collect()
        })
        .collect();
    let q: Vec<f32> = (0..sequences * kv_heads * args.group * hd)
        .map(|i| ((i * 31 % 257) as f32 - 128.0) / 128.0)
        .collect();
    let mut out = vec![0f32; q.len()];
    let kv = PagedKv {
        k: &k,
        v: &v,
        kv_heads,
        block_size: bs,
    };
    let width = args.group * hd;
    if let Some(chunk) = args.chunk {
        return chunk_step(args, level, &kv, &tables, chunk.min(context), context);
    }
    let t = time(args.setup.seconds, || {
        for tables in &layer_tables {
            out.par_chunks_mut(width)
                .zip(q.par_chunks(width))
                .enumerate()
                .for_each_init(AttendScratch::default, |scratch, (item, (out, q))| {
                    let (s, g) = (item / kv_heads, item % kv_heads);
                    let heads = HeadGroup {
                        q,
                        head_dim: hd,
                        kv_head: g,
                        scale: 1.0 / (hd as f32).sqrt(),
                    };
                    attend(level, &heads, &kv, &tables[s], 0..context, scratch, out);
                });
        }
    });
    t.as_secs_f64() * 1e6 / layers as f64
}

/// The median µs of one layer's prefill attention: each sequence's last `chunk` positions of
/// `context` as new tokens, one work item per (tile of tokens, KV head), in parallel.
fn chunk_step<T: KvElement>(
    args: &AttentionArgs,
    level: Level,
    kv: &PagedKv<'_, T>,
    tables: &[Vec<u32>],
    chunk: usize,
    context: usize,
) -> f64 {
    let (hd, group, kv_heads) = (args.head_dim, args.group, args.kv_heads);
    let stride = kv_heads * group * hd;
    let q: Vec<f32> = (0..chunk * stride)
        .map(|i| ((i * 31 % 257) as f32 - 128.0) / 128.0)
        .collect();
    let items: Vec<(usize, usize, usize)> = (0..tables.len())
        .flat_map(|s| {
            (0..chunk)
                .step_by(CHUNK_TILE)
                .flat_map(move |t| (0..kv_heads).map(move |g| (s, t, g)))
        })
        .collect();
    let item_len = CHUNK_TILE * group * hd;
    let mut out = vec![0f32; items.len() * item_len];
    let t = time(args.setup.seconds, || {
        out.par_chunks_mut(item_len)
            .zip(items.par_iter())
            .for_each_init(ChunkScratch::default, |scratch, (out, &(s, t, g))| {
                let n = CHUNK_TILE.min(chunk - t);
                let queries = ChunkQueries {
                    q: &q[t * stride..(t + n) * stride],
                    stride,
                    tokens: n,
                    head_dim: hd,
                    group,
                    kv_head: g,
                    scale: 1.0 / (hd as f32).sqrt(),
                    first: context - chunk + t,
                    window: usize::MAX,
                };
                let out = &mut out[..n * group * hd];
                attend_chunk(level, &queries, kv, &tables[s], scratch, out);
            });
    });
    t.as_secs_f64() * 1e6
}

pub fn markdown(r: &AttentionReport) -> String {
    let what = match r.chunk {
        None => "decode attention".to_string(),
        Some(n) => format!("prefill attention of {n}-token chunks"),
    };
    let mut s = format!(
        "{what} at {} on {} thread(s), {}; {} KV heads x {} query heads of {}, \
         blocks of {}; memory read {:.1} GB/s\n\n",
        r.level,
        r.threads,
        r.run.cpu_model,
        r.kv_heads,
        r.group,
        r.head_dim,
        r.block_size,
        r.read_bandwidth_gbs
    );
    s += "| KV dtype | sequences | context | µs per layer | KV GB/s | GFLOP/s |\n\
          |---|---:|---:|---:|---:|---:|\n";
    for x in &r.results {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            x.dtype, x.sequences, x.context, x.micros, x.kv_gbs, x.gflops
        );
    }
    s
}
