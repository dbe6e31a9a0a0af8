//! Connecting to the shards: service discovery, `ClearCache` → `Info` → `Warmup`, the token
//! limits (TGI's rules), then the queue and batching tasks.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::sync::Notify;
use wick_proto::v1 as pb;

use crate::batcher::{batching_task, BatchingConfig};
use crate::block_allocator::BlockAllocator;
use crate::client::{ShardLimits, ShardedClient};
use crate::infer::Infer;
use crate::metrics::BATCH_MAX_TOTAL_TOKENS;
use crate::queue::{Queue, State};

/// How to reach the shards and the limits asked for (`None` = derived at warmup).
#[derive(Debug, Clone)]
pub struct ShardSetup {
    /// Rank 0's socket (`{uds}-0`).
    pub master_shard_uds_path: PathBuf,
    pub max_input_tokens: Option<u32>,
    pub max_total_tokens: Option<u32>,
    pub max_batch_prefill_tokens: u32,
    /// Ignored (with a warning) when the shards report what their KV cache holds.
    pub max_batch_total_tokens: Option<u32>,
    pub max_batch_size: Option<usize>,
    pub waiting_served_ratio: f32,
    pub max_waiting_tokens: usize,
    pub max_concurrent_requests: usize,
}

/// What the HTTP side needs to know about the model and the limits in force.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    pub model_id: String,
    /// The shard's tokenizer in `tokenizer.json` form (the HTTP edge tokenizes with it).
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub max_batch_total_tokens: u32,
    pub block_size: u32,
    pub dtype: String,
    pub device_type: String,
    pub quantize: String,
    pub world_size: usize,
    pub cpu_model: String,
    pub cpu_features: Vec<String>,
    pub kernels: std::collections::BTreeMap<String, String>,
    /// The KV cache's element type, and the bytes one token takes in it on each rank.
    pub kv_cache_dtype: String,
    pub kv_cache_bytes_per_token: u64,
}

/// ServiceDiscovery from rank 0, connect to every rank, ClearCache → Info → Warmup (TGI's rules
/// for the limits), spawn the queue and batching tasks. Needs a tokio runtime.
pub async fn connect(setup: &ShardSetup) -> anyhow::Result<(Infer, BackendInfo)> {
    let client = ShardedClient::connect_uds(&setup.master_shard_uds_path)
        .await
        .with_context(|| {
            format!(
                "cannot reach the shards at {}",
                setup.master_shard_uds_path.display()
            )
        })?;
    client
        .clear_cache(None)
        .await
        .context("ClearCache failed")?;
    let info = client.info().await.context("Info failed")?;
    let block_size = info.block_size.max(1);
    // Any token of the vocabulary will do for synthetic prompts.
    let filler_token = info.bos_token_id.unwrap_or(0);

    let warmup = warmup_request(setup, &info, filler_token)?;
    let limits = client.warmup(warmup).await.map_err(|e| {
        anyhow::anyhow!(
            "warmup failed: {e}; decrease `--max-batch-prefill-tokens` ({}) or give the KV cache \
             more memory",
            setup.max_batch_prefill_tokens
        )
    })?;
    let limits = resolve_limits(setup, limits, block_size)?;
    metrics::gauge!(BATCH_MAX_TOTAL_TOKENS).set(limits.max_batch_total_tokens as f64);
    tracing::info!(
        max_input_tokens = limits.max_input_tokens,
        max_total_tokens = limits.max_total_tokens,
        max_batch_total_tokens = limits.max_batch_total_tokens,
        max_batch_prefill_tokens = setup.max_batch_prefill_tokens,
        block_size,
        "shards warmed up"
    );

    let allocator = BlockAllocator::new(
        limits.max_batch_total_tokens,
        block_size,
        info.use_prefix_caching,
    );
    let queue = Queue::spawn(State::new(allocator.clone(), info.support_chunking));
    let notifier = Arc::new(Notify::new());
    // Warmup ran a forward pass: the shards start healthy.
    let health = Arc::new(AtomicBool::new(true));
    let config = BatchingConfig {
        max_batch_prefill_tokens: setup.max_batch_prefill_tokens,
        max_batch_total_tokens: limits.max_batch_total_tokens,
        max_batch_size: setup.max_batch_size,
        waiting_served_ratio: setup.waiting_served_ratio,
        max_waiting_tokens: setup.max_waiting_tokens,
        support_chunking: info.support_chunking,
    };
    tokio::spawn(batching_task(
        client.clone(),
        config,
        queue.clone(),
        notifier.clone(),
        health.clone(),
    ));
    let world_size = client.world_size();
    let infer = Infer::new(
        queue,
        notifier,
        setup.max_concurrent_requests,
        health,
        client,
        allocator,
        filler_token,
    );
    let backend = BackendInfo {
        model_id: info.model_id,
        tokenizer_json: info.tokenizer_json,
        chat_template: info.chat_template,
        bos_token: info.bos_token,
        eos_token: info.eos_token,
        max_input_tokens: limits.max_input_tokens,
        max_total_tokens: limits.max_total_tokens,
        max_batch_total_tokens: limits.max_batch_total_tokens,
        block_size,
        dtype: info.dtype,
        device_type: info.device_type,
        quantize: info.quantize,
        world_size,
        cpu_model: info.cpu_model,
        cpu_features: info.cpu_features,
        kernels: info.kernels.into_iter().collect(),
        kv_cache_dtype: info.kv_cache_dtype,
        kv_cache_bytes_per_token: info.kv_cache_bytes_per_token,
    };
    Ok((infer, backend))
}

/// TGI's synthetic warmup batch: prompts of one repeated token, each at most
/// `max_input_tokens` long, summing to `max_batch_prefill_tokens`, at most `max_batch_size` of
/// them, with sampling on so every path runs. The shards run only its prefill, into blocks
/// given here one after the other; a batch the KV cache cannot hold fails here.
fn warmup_request(
    setup: &ShardSetup,
    info: &pb::InfoResponse,
    token: u32,
) -> anyhow::Result<pb::WarmupRequest> {
    let block_size = info.block_size.max(1);
    // A prompt also has to leave room for one new token within the model's positions.
    let position_cap = info.max_position_embeddings.saturating_sub(1).max(1);
    let max_input = setup
        .max_input_tokens
        .unwrap_or(position_cap)
        .clamp(1, position_cap);
    let mut requests = Vec::new();
    let mut n_tokens = 0u32;
    let mut next_block = 0u32;
    while n_tokens < setup.max_batch_prefill_tokens {
        let truncate = (setup.max_batch_prefill_tokens - n_tokens).min(max_input);
        let max_new_tokens = setup
            .max_total_tokens
            .map_or(1, |total| total.saturating_sub(truncate).max(1));
        let blocks = truncate.div_ceil(block_size);
        if next_block + blocks > info.num_blocks {
            anyhow::bail!(
                "not enough memory to handle {} prefill tokens ({} KV slots); decrease \
                 `--max-batch-prefill-tokens` or raise `--kv-cache-memory`",
                setup.max_batch_prefill_tokens,
                u64::from(info.num_blocks) * u64::from(block_size)
            );
        }
        requests.push(pb::Request {
            id: requests.len() as u64,
            input_ids: vec![token; truncate as usize],
            blocks: (next_block..next_block + blocks).collect(),
            parameters: Some(pb::NextTokenChooserParameters {
                temperature: 0.9,
                top_k: 10,
                top_p: 0.9,
                typical_p: 0.9,
                do_sample: true,
                seed: 0,
                repetition_penalty: 1.2,
                frequency_penalty: 0.1,
                ..Default::default()
            }),
            stopping_parameters: Some(pb::StoppingCriteriaParameters {
                max_new_tokens,
                stop_sequences: Vec::new(),
                ignore_eos_token: true,
                min_new_tokens: 0,
            }),
            prefill_logprobs: true,
            top_n_tokens: 20,
            ..Default::default()
        });
        n_tokens += truncate;
        next_block += blocks;
        if setup.max_batch_size == Some(requests.len()) {
            break;
        }
    }
    let size = requests.len() as u32;
    Ok(pb::WarmupRequest {
        batch: Some(pb::Batch {
            id: 0,
            requests,
            size,
            max_tokens: 0,
            max_blocks: 0,
        }),
        max_input_tokens: setup.max_input_tokens,
        max_prefill_tokens: setup.max_batch_prefill_tokens,
        max_total_tokens: setup.max_total_tokens,
    })
}

/// The limits in force after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    max_input_tokens: u32,
    max_total_tokens: u32,
    max_batch_total_tokens: u32,
}

/// TGI's rules for the limits, plus one of wick's: a request must fit the block pool (block 0
/// is reserved), or it would wait in the queue forever.
fn resolve_limits(
    setup: &ShardSetup,
    shard: ShardLimits,
    block_size: u32,
) -> anyhow::Result<Limits> {
    if let Some(asked) = setup.max_input_tokens {
        if asked != shard.max_input_tokens {
            bail!(
                "the shards report max_input_tokens {} where {asked} was asked",
                shard.max_input_tokens
            );
        }
    }
    if let Some(asked) = setup.max_total_tokens {
        if asked != shard.max_total_tokens {
            bail!(
                "the shards report max_total_tokens {} where {asked} was asked",
                shard.max_total_tokens
            );
        }
    }
    let max_batch_total_tokens = match shard.max_supported_total_tokens {
        Some(supported) => {
            if let Some(asked) = setup.max_batch_total_tokens {
                if asked != supported {
                    tracing::warn!(
                        asked,
                        supported,
                        "`--max-batch-total-tokens` is ignored: the KV cache size decides it"
                    );
                }
            }
            supported
        }
        None => setup.max_batch_total_tokens.unwrap_or_else(|| {
            16000
                .max(shard.max_total_tokens)
                .max(setup.max_batch_prefill_tokens)
        }),
    };
    // Positions a request can hold: every block but the reserved one; the last generated token
    // needs no slot.
    let pool_slots = (max_batch_total_tokens / block_size).saturating_sub(1) * block_size;
    let fits = pool_slots.saturating_add(1);
    let mut max_total_tokens = shard.max_total_tokens;
    let mut max_input_tokens = shard.max_input_tokens;
    if max_total_tokens > fits {
        if setup.max_total_tokens.is_some() {
            bail!(
                "not enough KV cache memory: `--max-total-tokens` {max_total_tokens} needs more \
                 than the {pool_slots} token slots available"
            );
        }
        max_total_tokens = fits;
        if setup.max_input_tokens.is_none() {
            max_input_tokens = max_input_tokens.min(max_total_tokens.saturating_sub(1));
        }
    }
    if max_input_tokens >= max_total_tokens {
        bail!(
            "`max_input_tokens` must be < `max_total_tokens`. Given: {max_input_tokens} and \
             {max_total_tokens}"
        );
    }
    if setup.max_batch_prefill_tokens > max_batch_total_tokens {
        bail!(
            "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. Given: {} and \
             {max_batch_total_tokens}",
            setup.max_batch_prefill_tokens
        );
    }
    if max_total_tokens > max_batch_total_tokens {
        bail!(
            "`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {max_total_tokens} \
             and {max_batch_total_tokens}"
        );
    }
    Ok(Limits {
        max_input_tokens,
        max_total_tokens,
        max_batch_total_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> ShardSetup {
        ShardSetup {
            master_shard_uds_path: PathBuf::from("/nonexistent-0"),
            max_input_tokens: None,
            max_total_tokens: None,
            max_batch_prefill_tokens: 100,
            max_batch_total_tokens: None,
            max_batch_size: None,
            waiting_served_ratio: 0.3,
            max_waiting_tokens: 20,
            max_concurrent_requests: 8,
        }
    }

    fn info(max_position_embeddings: u32) -> pb::InfoResponse {
        pb::InfoResponse {
            max_position_embeddings,
            block_size: 16,
            num_blocks: 64,
            ..Default::default()
        }
    }

    fn prompt_lens(r: &pb::WarmupRequest) -> Vec<usize> {
        let batch = r.batch.as_ref().unwrap();
        assert_eq!(batch.size as usize, batch.requests.len());
        batch.requests.iter().map(|r| r.input_ids.len()).collect()
    }

    #[test]
    fn warmup_prompts_sum_to_the_prefill_budget() {
        let mut s = setup();
        s.max_input_tokens = Some(30);
        let r = warmup_request(&s, &info(1000), 7).unwrap();
        assert_eq!(prompt_lens(&r), vec![30, 30, 30, 10]);
        let requests = r.batch.unwrap().requests;
        assert!(requests[0].input_ids.iter().all(|&t| t == 7));
        // Each prompt gets its own blocks, one after the other.
        let blocks: Vec<Vec<u32>> = requests.iter().map(|r| r.blocks.clone()).collect();
        assert_eq!(blocks, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6]]);
        // Without a limit a prompt is capped by the model's positions.
        let r = warmup_request(&setup(), &info(41), 7).unwrap();
        assert_eq!(prompt_lens(&r), vec![40, 40, 20]);
        // A budget the KV cache cannot hold fails before the shards see it.
        let mut small = info(1000);
        small.num_blocks = 6;
        let err = warmup_request(&s, &small, 7).unwrap_err().to_string();
        assert!(
            err.contains("not enough memory to handle 100 prefill tokens (96 KV slots)"),
            "{err}"
        );
    }

    #[test]
    fn warmup_stops_at_max_batch_size() {
        let mut s = setup();
        s.max_input_tokens = Some(10);
        s.max_batch_size = Some(2);
        assert_eq!(
            prompt_lens(&warmup_request(&s, &info(1000), 0).unwrap()),
            vec![10, 10]
        );
    }

    fn shard(supported: u32, input: u32, total: u32) -> ShardLimits {
        ShardLimits {
            max_supported_total_tokens: Some(supported),
            max_input_tokens: input,
            max_total_tokens: total,
        }
    }

    #[test]
    fn the_kv_cache_decides_the_batch_total() {
        let mut s = setup();
        s.max_batch_total_tokens = Some(5);
        let l = resolve_limits(&s, shard(4096, 1023, 1024), 16).unwrap();
        assert_eq!(
            l,
            Limits {
                max_input_tokens: 1023,
                max_total_tokens: 1024,
                max_batch_total_tokens: 4096
            }
        );
    }

    #[test]
    fn derived_limits_shrink_to_fit_the_block_pool() {
        // 8 blocks of 16, one reserved: 112 positions, so at most 113 tokens.
        let l = resolve_limits(&setup(), shard(128, 127, 128), 16).unwrap();
        assert_eq!((l.max_input_tokens, l.max_total_tokens), (112, 113));
        // Asked limits that cannot fit are an error.
        let mut s = setup();
        s.max_total_tokens = Some(128);
        assert!(resolve_limits(&s, shard(128, 127, 128), 16).is_err());
    }

    #[test]
    fn inconsistent_limits_are_refused() {
        let mut s = setup();
        s.max_batch_prefill_tokens = 5000;
        assert!(resolve_limits(&s, shard(4096, 100, 200), 16).is_err());
        let mut s = setup();
        s.max_input_tokens = Some(50);
        assert!(resolve_limits(&s, shard(4096, 100, 200), 16).is_err());
    }
}
