//! The real `wick-shard` binary, started and driven over its unix socket the way the router
//! drives it; shared by the gRPC test files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use wick_backend_candle::testing::ShardProcess;
use wick_proto::v1 as pb;
use wick_proto::ShardClient;

/// The shard process; killed on drop (also when a test fails), its log printed on failure.
pub type Shard = ShardProcess;

/// Starts `wick-shard serve` on `model` at `uds_base` (1 MiB of KV cache, one thread, offline)
/// with `extra` arguments, logging to `log`.
pub fn start_shard(model: &Path, uds_base: &Path, log: PathBuf, extra: &[&str]) -> Shard {
    let mut args = vec!["--kv-cache-memory", "1MiB", "--threads", "1", "--offline"];
    args.extend_from_slice(extra);
    ShardProcess::spawn(
        Path::new(env!("CARGO_BIN_EXE_wick-shard")),
        model,
        uds_base,
        &args,
        log,
    )
}

/// Connects once the shard answers `Health`.
pub async fn connect(shard: &mut Shard, socket: &Path) -> ShardClient {
    for _ in 0..600 {
        if let Some(status) = shard.child.try_wait().unwrap() {
            panic!("wick-shard exited early: {status}");
        }
        if let Ok(mut client) = wick_proto::connect_uds(socket).await {
            if client.health(pb::HealthRequest {}).await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("wick-shard did not become healthy");
}

/// Token slots per KV block of the shards these tests start (the default).
pub const BLOCK_SIZE: usize = 16;

/// KV blocks of the region request `id` owns: the router's part in these tests is to give
/// request `id` blocks `8·id..`, so requests with different ids never share one.
pub const BLOCKS_PER_ID: usize = 8;

/// A greedy request with the KV blocks its prompt and new tokens need, in its id's region.
pub fn request(id: u64, input_ids: Vec<u32>, max_new_tokens: u32) -> pb::Request {
    let first = id as usize * BLOCKS_PER_ID;
    let positions = input_ids.len() + max_new_tokens as usize - 1;
    let blocks = (first..first + positions.div_ceil(BLOCK_SIZE))
        .map(|b| b as u32)
        .collect();
    pb::Request {
        id,
        input_ids,
        blocks,
        parameters: Some(pb::NextTokenChooserParameters::default()),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens,
            stop_sequences: Vec::new(),
            ignore_eos_token: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn batch(id: u64, requests: Vec<pb::Request>) -> pb::Batch {
    pb::Batch {
        id,
        size: requests.len() as u32,
        requests,
        max_tokens: 0,
        max_blocks: 0,
    }
}

/// Decodes `batch` until every request finished, each step computed ahead of its call;
/// returns the generations.
pub async fn decode_to_end(
    client: &mut ShardClient,
    mut batch: Option<pb::CachedBatch>,
) -> Vec<pb::Generation> {
    let mut generations = Vec::new();
    while let Some(b) = batch {
        let resp = client
            .decode(pb::DecodeRequest {
                batches: vec![b],
                run_ahead: true,
            })
            .await
            .unwrap()
            .into_inner();
        generations.extend(resp.generations);
        batch = resp.batch;
    }
    generations
}
