//! The batching loop (TGI v3's `batching_task`): the one task that owns the sharded client. It
//! starts a batch from the queue, then steps it until every request is done; before each step
//! it admits queued requests into the running batch.
//!
//! Each step's generations go to their requests' channels. A request whose client left is
//! removed (its blocks freed on drop) and filtered out of the shard batch before the next step.
//! A shard error fails every request of the batch, clears it on the shards, marks the backend
//! unhealthy, and the loop goes on with the queue.
//!
//! When nothing waits in the queue as a step is sent, the step asks the shards to run ahead:
//! they compute the batch's next decode as soon as this step ends, while the answer travels and
//! the loop delivers it, so the shards do not sit idle through the round trip.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use wick_proto::v1 as pb;

use crate::client::{ClientError, ShardedClient, StepResult};
use crate::metrics::{
    BATCH_CONCAT, BATCH_CONCAT_DURATION, BATCH_CURRENT_MAX_TOKENS, BATCH_CURRENT_SIZE,
    BATCH_DECODE_DURATION, BATCH_FILTER_DURATION, BATCH_FORWARD_ATTENTION_DURATION,
    BATCH_FORWARD_DURATION, BATCH_FORWARD_LINEAR_DURATION, BATCH_INFERENCE_COUNT,
    BATCH_INFERENCE_DURATION, BATCH_INFERENCE_FAILURE, BATCH_INFERENCE_SUCCESS, BATCH_RUN_AHEAD,
    BATCH_SHARD_IDLE_DURATION,
};
use crate::queue::{Entry, Queue};
use crate::request::{GeneratedText, InferError, InferStreamResponse, Token};

/// How long the loop waits for the shards to drop a failed batch before it moves on (a hung
/// tensor-parallel rank would otherwise hold the loop).
const CLEAR_AFTER_ERROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The running requests by id.
type Entries = HashMap<u64, Entry>;

/// The batching rules.
#[derive(Debug, Clone)]
pub struct BatchingConfig {
    /// Prompt tokens one forward pass may compute.
    pub max_batch_prefill_tokens: u32,
    /// KV token slots of the whole pool.
    pub max_batch_total_tokens: u32,
    pub max_batch_size: Option<usize>,
    /// Without chunking: admit new requests only when at least `ratio × running` wait ...
    pub waiting_served_ratio: f32,
    /// ... unless this many decode steps passed since the last admission.
    pub max_waiting_tokens: usize,
    /// The shards can run new (possibly chunked) prompts in the same forward pass as decodes.
    pub support_chunking: bool,
}

/// Runs forever (until the runtime shuts down), woken by `notifier` when requests are queued.
pub async fn batching_task(
    client: ShardedClient,
    config: BatchingConfig,
    queue: Queue,
    notifier: Arc<Notify>,
    health: Arc<AtomicBool>,
) {
    let batcher = Batcher { client, health };
    loop {
        // `Notify` stores a permit, so a request queued while a batch ran is not missed.
        notifier.notified().await;
        while let Some((mut entries, batch)) = queue
            .next_batch(
                None,
                config.max_batch_size,
                config.max_batch_prefill_tokens,
                config.max_batch_total_tokens,
            )
            .await
        {
            // Each step runs ahead when nothing is waiting to join the next one.
            let run_ahead = queue.is_empty();
            let mut cached = batcher.prefill(batch, None, run_ahead, &mut entries).await;
            let mut waiting_tokens = 1;
            while let Some(batch) = cached {
                let batch_size = batch.size as usize;
                metrics::gauge!(BATCH_CURRENT_SIZE).set(batch_size as f64);
                metrics::gauge!(BATCH_CURRENT_MAX_TOKENS).set(batch.max_tokens as f64);
                let token_budget = config
                    .max_batch_total_tokens
                    .saturating_sub(batch.max_tokens);
                let max_size = config
                    .max_batch_size
                    .map(|max| max.saturating_sub(batch_size));
                let (min_size, prefill_budget) = if config.support_chunking {
                    // The new requests step together with the running ones: the running
                    // batch's own tokens come out of the prefill budget.
                    let budget = config
                        .max_batch_prefill_tokens
                        .saturating_sub(batch.current_tokens);
                    (None, budget)
                } else if waiting_tokens >= config.max_waiting_tokens {
                    // Waited long enough: take whatever is there.
                    (None, config.max_batch_prefill_tokens)
                } else {
                    // Pausing the running batch for a prefill pays off only for enough new
                    // requests.
                    let min = (batch_size as f32 * config.waiting_served_ratio).floor() as usize;
                    (Some(min), config.max_batch_prefill_tokens)
                };

                let mut batches = Vec::with_capacity(2);
                let mut running = Some(batch);
                // Requests queued while a step ran ahead join at once: the shards then run
                // their prompts as a step of their own and join the two answers (holding them
                // back a step instead cost more time in the queue than that extra pass).
                if let Some((mut new_entries, new_batch)) = queue
                    .next_batch(min_size, max_size, prefill_budget, token_budget)
                    .await
                {
                    let reason = match (config.support_chunking, min_size) {
                        (true, _) => "chunking",
                        (false, Some(_)) => "backpressure",
                        (false, None) => "wait_exceeded",
                    };
                    metrics::counter!(BATCH_CONCAT, "reason" => reason).increment(1);
                    let new_cached = if config.support_chunking {
                        // One forward pass: new prompts (or their first chunk) and one decode
                        // step of the running requests; the result keeps the running batch id.
                        entries.extend(new_entries);
                        let run_ahead = queue.is_empty();
                        let merged = batcher
                            .prefill(new_batch, running.take(), run_ahead, &mut entries)
                            .await;
                        if merged.is_none() {
                            break;
                        }
                        merged
                    } else {
                        // The running requests wait while the new ones are prefilled alone
                        // (and the next step merges the two batches: nothing runs ahead).
                        let new_cached = batcher
                            .prefill(new_batch, None, false, &mut new_entries)
                            .await;
                        if new_cached.is_some() {
                            entries.extend(new_entries);
                        }
                        new_cached
                    };
                    waiting_tokens = 1;
                    batches.extend(running.take());
                    batches.extend(new_cached);
                } else {
                    batches.extend(running.take());
                }
                let run_ahead = queue.is_empty();
                cached = batcher.decode(batches, run_ahead, &mut entries).await;
                waiting_tokens += 1;
            }
            metrics::gauge!(BATCH_CURRENT_SIZE).set(0.0);
            metrics::gauge!(BATCH_CURRENT_MAX_TOKENS).set(0.0);
        }
    }
}

struct Batcher {
    client: ShardedClient,
    health: Arc<AtomicBool>,
}

/// How a step was asked for.
#[derive(Clone, Copy)]
struct Sent {
    method: &'static str,
    /// It stepped a running batch (so the shards' wait before it is the loop's overhead).
    running: bool,
    run_ahead: bool,
}

impl Batcher {
    /// Starts `batch` (merged into `cached` when given) and delivers the first tokens.
    async fn prefill(
        &self,
        batch: pb::Batch,
        cached: Option<pb::CachedBatch>,
        run_ahead: bool,
        entries: &mut Entries,
    ) -> Option<pb::CachedBatch> {
        let involved = [Some(batch.id), cached.as_ref().map(|b| b.id)];
        let sent = Sent {
            method: "prefill",
            running: cached.is_some(),
            run_ahead,
        };
        let result = self.client.prefill(batch, cached, run_ahead).await;
        self.step(sent, result, involved, entries).await
    }

    /// One step of every request of `batches` (merged into the first on the shards); the loop
    /// passes one batch, or two right after admitting requests without chunking.
    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
        run_ahead: bool,
        entries: &mut Entries,
    ) -> Option<pb::CachedBatch> {
        debug_assert!(batches.len() <= 2);
        let involved = [batches.first().map(|b| b.id), batches.get(1).map(|b| b.id)];
        let sent = Sent {
            method: "decode",
            running: true,
            run_ahead,
        };
        let result = self.client.decode(batches, run_ahead).await;
        self.step(sent, result, involved, entries).await
    }

    /// Delivers a step's generations and filters the batch, or fails the whole batch.
    async fn step(
        &self,
        sent: Sent,
        result: Result<StepResult, ClientError>,
        involved: [Option<u64>; 2],
        entries: &mut Entries,
    ) -> Option<pb::CachedBatch> {
        let start = Instant::now();
        let method = sent.method;
        metrics::counter!(BATCH_INFERENCE_COUNT, "method" => method).increment(1);
        let outcome = match result {
            Ok((generations, next, timings)) => {
                send_generations(generations, entries);
                match self.filter_batch(next, entries).await {
                    Ok(next) => Ok((next, timings)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok((next, timings)) => {
                let ns = |n: u64| Duration::from_nanos(n).as_secs_f64();
                metrics::histogram!(BATCH_FORWARD_DURATION, "method" => method)
                    .record(ns(timings.forward_ns));
                metrics::histogram!(BATCH_FORWARD_LINEAR_DURATION, "method" => method)
                    .record(ns(timings.linear_ns));
                metrics::histogram!(BATCH_FORWARD_ATTENTION_DURATION, "method" => method)
                    .record(ns(timings.attention_ns));
                metrics::histogram!(BATCH_DECODE_DURATION, "method" => method)
                    .record(ns(timings.decode_ns));
                if let (true, Some(idle)) = (sent.running, timings.idle_ns) {
                    metrics::histogram!(BATCH_SHARD_IDLE_DURATION, "method" => method)
                        .record(ns(idle));
                }
                if sent.run_ahead && next.is_some() {
                    metrics::counter!(BATCH_RUN_AHEAD).increment(1);
                }
                if let Some(concat) = timings.concat_ns {
                    metrics::histogram!(BATCH_CONCAT_DURATION, "method" => method)
                        .record(ns(concat));
                }
                metrics::histogram!(BATCH_FILTER_DURATION, "method" => method)
                    .record(start.elapsed().as_secs_f64());
                metrics::histogram!(BATCH_INFERENCE_DURATION, "method" => method)
                    .record(ns(timings.total_ns) + start.elapsed().as_secs_f64());
                metrics::counter!(BATCH_INFERENCE_SUCCESS, "method" => method).increment(1);
                next
            }
            Err(e) => {
                metrics::counter!(BATCH_INFERENCE_FAILURE, "method" => method).increment(1);
                tracing::error!(method, error = %e, "batch failed");
                self.health.store(false, Ordering::SeqCst);
                // The requests hear first: clearing may wait on a shard that hangs.
                send_errors(&e, entries);
                for id in involved.into_iter().flatten() {
                    let clear = self.client.clear_cache(Some(id));
                    if tokio::time::timeout(CLEAR_AFTER_ERROR_TIMEOUT, clear)
                        .await
                        .is_err()
                    {
                        tracing::error!(
                            batch = id,
                            "a shard did not answer ClearCache after the error"
                        );
                    }
                }
                None
            }
        }
    }

    /// Drops the requests no longer in `entries` (client gone) from the shard batch.
    async fn filter_batch(
        &self,
        next: Option<pb::CachedBatch>,
        entries: &Entries,
    ) -> Result<Option<pb::CachedBatch>, ClientError> {
        let Some(batch) = next else {
            return Ok(None);
        };
        // The shard already dropped the requests that finished, as did `send_generations`.
        if batch.size as usize == entries.len() {
            return Ok(Some(batch));
        }
        if entries.is_empty() {
            self.client.clear_cache(Some(batch.id)).await?;
            return Ok(None);
        }
        let keep: Vec<u64> = batch
            .request_ids
            .iter()
            .copied()
            .filter(|id| entries.contains_key(id))
            .collect();
        self.client.filter_batch(batch.id, keep).await
    }
}

/// Sends each generation to its request; removes the requests that ended or whose client left.
fn send_generations(generations: Vec<pb::Generation>, entries: &mut Entries) {
    for generation in generations {
        let id = generation.request_id;
        let Some(entry) = entries.get_mut(&id) else {
            continue;
        };
        if send_responses(generation, entry) {
            entries.remove(&id);
        }
    }
    // Clients that left while their prompt is still being chunked have no generation to fail
    // on: find them here, so they cost no further step.
    entries.retain(|_, e| !e.response_tx.is_closed());
}

/// Sends one generation's events; true when the request is over (ended or client gone).
fn send_responses(generation: pb::Generation, entry: &mut Entry) -> bool {
    if entry.response_tx.is_closed() {
        return true;
    }
    // A generation comes only once the whole prompt went through the model: its blocks now
    // hold the prompt's K/V and may serve as a prefix cache.
    if let Some(allocation) = entry.block_allocation.as_mut() {
        allocation.mark_prompt_computed();
    }
    if let Some(prefill) = generation.prefill_tokens {
        if !prefill.ids.is_empty() {
            let event = InferStreamResponse::Prefill(tokens(prefill));
            if entry.response_tx.send(Ok(event)).is_err() {
                return true;
            }
        }
    }
    let Some(generated) = generation.tokens else {
        // No token to attach an end to: the stream just stops (an incomplete generation).
        return generation.generated_text.is_some();
    };
    entry.start_decode();
    let mut top_tokens = generation.top_tokens.into_iter();
    let mut generated_text = generation.generated_text;
    let mut ended = false;
    // Several tokens per step only with speculation; the last one carries the end.
    let mut tokens = tokens(generated).into_iter().peekable();
    while let Some(token) = tokens.next() {
        let top_tokens = top_tokens.next().map(self::tokens).unwrap_or_default();
        let last = tokens.peek().is_none();
        let end = if last { generated_text.take() } else { None };
        let event = match end {
            Some(text) => {
                ended = true;
                let reason = finish_reason(text.finish_reason);
                entry.finish(text.generated_tokens, reason);
                InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text: GeneratedText {
                        text: text.text,
                        generated_tokens: text.generated_tokens,
                        finish_reason: reason,
                        stop_sequence_start: text.stop_sequence_start.map(|at| at as usize),
                        seed: text.seed,
                    },
                    queued: entry.queue_time,
                    start: entry.batch_time.unwrap_or(entry.queue_time),
                }
            }
            None => InferStreamResponse::Intermediate { token, top_tokens },
        };
        if entry.response_tx.send(Ok(event)).is_err() {
            return true;
        }
    }
    ended
}

fn tokens(t: pb::Tokens) -> Vec<Token> {
    t.ids
        .into_iter()
        .zip(t.logprobs)
        .zip(t.texts)
        .zip(t.is_special)
        .map(|(((id, logprob), text), special)| Token {
            id,
            text,
            logprob,
            special,
        })
        .collect()
}

/// The wire's reason; a value this router does not know reads as `Length`.
fn finish_reason(reason: i32) -> pb::FinishReason {
    pb::FinishReason::try_from(reason).unwrap_or(pb::FinishReason::Length)
}

/// Fails every request of a batch the shards could not run. (The HTTP side counts these in
/// `tgi_request_failure{err="generation"}` when it turns the error into a response.)
fn send_errors(error: &ClientError, entries: &mut Entries) {
    let message = error.to_string();
    for (_, entry) in entries.drain() {
        let _ = entry
            .response_tx
            .send(Err(InferError::GenerationError(message.clone())));
    }
}
