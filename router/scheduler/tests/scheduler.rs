//! The scheduler (queue, block allocator, prefix cache, batching loop, sharded client) against
//! the real `wick-shard` binary on a tiny model.
//!
//! Each test runs on a single-threaded runtime inside its own local metrics recorder: the
//! batching loop's metrics are then the test's own, and the interleaving of the test with the
//! batching loop only changes at awaits, which makes "joins a running batch" deterministic.

mod common;

use std::future::Future;
use std::time::Duration;

use common::{connect_when_ready, start_shard, Shard};

use futures::stream::{BoxStream, StreamExt};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use wick_backend_candle::testing::tiny_vocab_size;
use wick_scheduler::infer::{Backend, Infer};
use wick_scheduler::metrics::{
    BATCH_CONCAT, BATCH_CURRENT_SIZE, BATCH_INFERENCE_FAILURE, PREFIX_CACHE_HIT_TOKENS,
};
use wick_scheduler::request::{
    InferError, InferStreamResponse, ValidParameters, ValidRequest, ValidStoppingParameters,
};
use wick_scheduler::startup::{BackendInfo, ShardSetup};

const BLOCK_SIZE: u32 = 16;

/// Starts a shard on a fresh tiny Llama with 64 KV blocks of 16 (512 bytes per slot) and
/// connects the scheduler with a prefill budget of 64 tokens, so longer prompts are chunked.
async fn start() -> (Shard, Infer, BackendInfo) {
    let mut shard = start_shard(&[
        "--kv-cache-memory",
        "512KiB",
        "--block-size",
        &BLOCK_SIZE.to_string(),
    ]);
    let setup = ShardSetup {
        master_shard_uds_path: shard.socket.clone(),
        max_input_tokens: None,
        max_total_tokens: None,
        max_batch_prefill_tokens: 64,
        max_batch_total_tokens: None,
        max_batch_size: None,
        waiting_served_ratio: 0.3,
        max_waiting_tokens: 20,
        max_concurrent_requests: 16,
    };
    let (infer, info) = connect_when_ready(&mut shard, &setup).await;
    (shard, infer, info)
}

/// Runs `test` on a current-thread runtime with its own metrics recorder.
fn run<F, Fut>(test: F)
where
    F: FnOnce(PrometheusHandle) -> Fut,
    Fut: Future<Output = ()>,
{
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(300), test(handle))
                .await
                .expect("the test finished")
        })
    });
}

/// The value of the counter or gauge rendered as `series` (name with labels), 0 if absent.
fn metric(handle: &PrometheusHandle, series: &str) -> f64 {
    handle
        .render()
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// A greedy request that always generates `max_new_tokens` tokens.
fn request(input_ids: Vec<u32>, max_new_tokens: u32) -> ValidRequest {
    ValidRequest {
        input_ids,
        parameters: ValidParameters {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            grammar: None,
            logit_bias: Vec::new(),
        },
        stopping: ValidStoppingParameters {
            max_new_tokens,
            stop_sequences: Vec::new(),
            ignore_eos_token: true,
            min_new_tokens: 0,
        },
        top_n_tokens: 0,
        decoder_input_details: false,
    }
}

/// A prompt of `len` tokens (special tokens avoided) whose first token is set by `seed`, so
/// different seeds share no prefix block.
fn prompt(len: u32, seed: u32) -> Vec<u32> {
    let span = tiny_vocab_size() as u32 - 10;
    (0..len).map(|i| 5 + (seed * 31 + i * 7) % span).collect()
}

type Events = BoxStream<'static, Result<InferStreamResponse, InferError>>;

fn submit(infer: &Infer, request: ValidRequest) -> Events {
    let permit = infer.try_acquire_permit().unwrap();
    infer.generate_stream(permit, request).unwrap()
}

/// Reads a stream to its end: the generated token ids, checked against the end event.
async fn collect(events: Events) -> Vec<u32> {
    collect_after(events, Vec::new()).await
}

/// [`collect`] for a stream whose first tokens (`ids`) were already read.
async fn collect_after(mut events: Events, mut ids: Vec<u32>) -> Vec<u32> {
    while let Some(event) = events.next().await {
        match event.expect("no error") {
            InferStreamResponse::Prefill(_) => assert!(ids.is_empty()),
            InferStreamResponse::Intermediate { token, .. } => ids.push(token.id),
            InferStreamResponse::End {
                token,
                generated_text,
                queued,
                start,
                ..
            } => {
                ids.push(token.id);
                assert_eq!(generated_text.generated_tokens as usize, ids.len());
                assert_eq!(
                    generated_text.finish_reason,
                    wick_proto::FinishReason::Length
                );
                assert!(start >= queued);
                assert!(events.next().await.is_none(), "nothing after the end");
                return ids;
            }
        }
    }
    panic!("the stream ended without an end event after {ids:?}");
}

/// Each request alone, every prompt token computed (prompt logprobs turn the prefix cache off).
async fn alone_without_cache(infer: &Infer, requests: &[ValidRequest]) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for r in requests {
        let mut r = r.clone();
        r.decoder_input_details = true;
        out.push(collect(submit(infer, r)).await);
    }
    out
}

#[test]
fn batched_requests_and_prefix_hits_give_the_tokens_of_single_requests() {
    run(|metrics| async move {
        let (_shard, infer, info) = start().await;
        assert_eq!(info.block_size, BLOCK_SIZE);
        assert!(infer.health().await);
        // Several blocks each, one prompt longer than the prefill budget (chunked).
        let requests: Vec<ValidRequest> = [(5, 9), (20, 12), (37, 7), (90, 10), (48, 11)]
            .iter()
            .enumerate()
            .map(|(i, &(len, new))| request(prompt(len, i as u32), new))
            .collect();

        // All at once on a cold cache: they share no prefix, so nothing is reused.
        let streams: Vec<Events> = requests.iter().map(|r| submit(&infer, r.clone())).collect();
        let batched = futures::future::join_all(streams.into_iter().map(collect)).await;
        assert_eq!(metric(&metrics, PREFIX_CACHE_HIT_TOKENS), 0.0);

        let single = alone_without_cache(&infer, &requests).await;
        assert_eq!(batched, single);
        for (tokens, r) in single.iter().zip(&requests) {
            assert_eq!(tokens.len() as u32, r.stopping.max_new_tokens);
        }

        // The same prompts again: their whole blocks are cached now.
        let mut cached = Vec::new();
        for r in &requests {
            cached.push(collect(submit(&infer, r.clone())).await);
        }
        // 0 + 16 + 32 + 80 + 47 (a fully cached prompt recomputes its last token).
        assert_eq!(metric(&metrics, PREFIX_CACHE_HIT_TOKENS), 175.0);
        assert_eq!(cached, single);

        // A prompt extending a cached one reuses its blocks and continues the same way as
        // without the cache.
        let mut longer = requests[3].input_ids.clone();
        longer.extend(prompt(30, 9));
        let longer = request(longer, 6);
        let before = metric(&metrics, PREFIX_CACHE_HIT_TOKENS);
        let with_hit = collect(submit(&infer, longer.clone())).await;
        assert_eq!(metric(&metrics, PREFIX_CACHE_HIT_TOKENS) - before, 80.0);
        assert_eq!(vec![with_hit], alone_without_cache(&infer, &[longer]).await);

        // Every block is free again (or cached and evictable).
        assert_eq!(infer.free_kv_blocks(), infer.total_kv_blocks());
    });
}

#[test]
fn a_request_arriving_while_others_decode_joins_the_running_batch() {
    run(|metrics| async move {
        let (_shard, infer, _) = start().await;
        let long = request(prompt(10, 1), 60);
        let late = request(prompt(25, 2), 8);
        let expected = alone_without_cache(&infer, &[long.clone(), late.clone()]).await;
        let concat = format!("{BATCH_CONCAT}{{reason=\"chunking\"}}");
        let joins_before = metric(&metrics, &concat);

        let mut first = submit(&infer, long);
        let Some(Ok(InferStreamResponse::Intermediate { token, .. })) = first.next().await else {
            panic!("the long request's first token");
        };
        // The batching loop cannot step between the first token and this submission (one
        // thread), and the long request has 59 steps to go.
        let second = submit(&infer, late);
        let (long_tokens, late_tokens) =
            futures::future::join(collect_after(first, vec![token.id]), collect(second)).await;
        assert_eq!(metric(&metrics, &concat) - joins_before, 1.0);
        assert_eq!(vec![long_tokens, late_tokens], expected);
    });
}

#[test]
fn a_dropped_stream_frees_its_blocks_and_the_next_request_runs() {
    run(|metrics| async move {
        let (_shard, infer, _) = start().await;
        let free = infer.free_kv_blocks();
        let next = request(prompt(30, 4), 12);
        let expected = alone_without_cache(&infer, std::slice::from_ref(&next)).await;

        let mut gone = submit(&infer, request(prompt(40, 3), 300));
        for _ in 0..3 {
            assert!(matches!(
                gone.next().await,
                Some(Ok(InferStreamResponse::Intermediate { .. }))
            ));
        }
        // 40 + 300 − 1 positions: 22 blocks.
        assert_eq!(infer.free_kv_blocks(), free - 22);
        drop(gone);

        // The dropped request leaves the shard batch before the next one is admitted into
        // its blocks: were it still running, it would write over them.
        assert_eq!(collect(submit(&infer, next)).await, expected[0]);
        assert_eq!(infer.free_kv_blocks(), free);
        // Nothing runs any more: the shard batch ended with the last request (on one thread,
        // the loop reaches its idle state before this test resumes).
        assert_eq!(metric(&metrics, BATCH_CURRENT_SIZE), 0.0);
    });
}

#[test]
fn a_shard_error_fails_its_batch_and_the_scheduler_recovers() {
    run(|metrics| async move {
        let (_shard, infer, _) = start().await;
        // A token outside the vocabulary makes the shard refuse the batch.
        let bad = request(vec![tiny_vocab_size() as u32 + 5], 4);
        let mut events = submit(&infer, bad);
        match events.next().await {
            Some(Err(e @ InferError::GenerationError(_))) => {
                assert_eq!(e.error_type(), "generation");
                assert!(e
                    .to_string()
                    .starts_with("Request failed during generation"));
            }
            other => panic!("expected a generation error, got {other:?}"),
        }
        assert!(events.next().await.is_none());
        let failures = format!("{BATCH_INFERENCE_FAILURE}{{method=\"prefill\"}}");
        assert_eq!(metric(&metrics, &failures), 1.0);
        assert_eq!(infer.free_kv_blocks(), infer.total_kv_blocks());

        // Unhealthy until a liveness forward pass succeeds, which it does.
        assert!(infer.health().await);
        let tokens = collect(submit(&infer, request(prompt(12, 5), 5))).await;
        assert_eq!(tokens.len(), 5);
    });
}

#[test]
fn permits_bound_concurrent_requests() {
    run(|_metrics| async move {
        let (_shard, infer, _) = start().await;
        let held: Vec<_> = (0..16)
            .map(|_| infer.try_acquire_permit().unwrap())
            .collect();
        assert_eq!(
            infer.try_acquire_permit().unwrap_err(),
            InferError::Overloaded
        );
        drop(held);
        // A stream holds its permit until it is dropped.
        let streams: Vec<Events> = (0..16)
            .map(|i| submit(&infer, request(prompt(3, i), 2)))
            .collect();
        assert!(infer.try_acquire_permit().is_err());
        drop(streams);
        assert!(infer.try_acquire_permit().is_ok());
    });
}
