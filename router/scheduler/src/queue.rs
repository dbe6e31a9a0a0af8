//! The request queue: an actor owning [`State`] (FIFO entries, request and batch ids, the block
//! allocator), asked by the batching loop for the next batch to start.
//!
//! Admission follows TGI v3 for paged models: entries are taken in order while their KV blocks
//! can be allocated and their uncached prompt tokens fit the prefill budget; the first entry
//! that does not fit stops the batch (head-of-line, so no request is starved by smaller ones).
//! With chunking, that entry still joins with the part of its prompt that fits (`chunk_len`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use wick_proto::v1 as pb;

use crate::block_allocator::{BlockAllocation, BlockAllocator};
use crate::metrics::{
    BATCH_NEXT_SIZE, PREFIX_CACHE_HIT_TOKENS, PREFIX_CACHE_PROMPT_TOKENS, QUEUE_SIZE,
    REQUEST_FAILURE,
};
use crate::request::{InferError, InferStreamResponse, ValidRequest};

/// Where a request's events go.
pub type ResponseSender = mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>;

/// A request waiting in the queue or running in a batch.
#[derive(Debug)]
pub struct Entry {
    pub request: ValidRequest,
    pub response_tx: ResponseSender,
    /// When the request entered the queue.
    pub queue_time: Instant,
    /// When its batch was built.
    pub batch_time: Option<Instant>,
    /// Its KV blocks, from the moment it is batched; dropping the entry frees them.
    pub block_allocation: Option<BlockAllocation>,
    /// The span the request was queued in (the HTTP request's).
    pub span: tracing::Span,
    /// Its phase now, a child of `span`: `queue`, then `prefill` (until its first token), then
    /// `decode`. Dropping the entry ends it.
    pub phase: Phase,
}

/// A request's phase in the scheduler, as a span.
#[derive(Debug)]
pub enum Phase {
    Queue(tracing::Span),
    Prefill(tracing::Span),
    Decode(tracing::Span),
}

impl Entry {
    /// A request entering the queue now, in the current span.
    pub fn new(request: ValidRequest, response_tx: ResponseSender) -> Self {
        let span = tracing::Span::current();
        let phase = Phase::Queue(tracing::info_span!(parent: &span, "queue"));
        Self {
            request,
            response_tx,
            queue_time: Instant::now(),
            batch_time: None,
            block_allocation: None,
            span,
            phase,
        }
    }

    /// The request joined a new batch of `batch_size` requests: its prompt (less the `cached`
    /// tokens the prefix cache holds) goes through the model.
    pub fn start_prefill(&mut self, batch_size: usize, cached: u32) {
        let span = tracing::info_span!(
            parent: &self.span,
            "prefill",
            batch_size,
            input_tokens = self.request.input_ids.len(),
            cached_tokens = cached,
        );
        self.phase = Phase::Prefill(span);
    }

    /// The first token came: from now on the request decodes.
    pub fn start_decode(&mut self) {
        if let Phase::Prefill(_) | Phase::Queue(_) = self.phase {
            let span = tracing::info_span!(
                parent: &self.span,
                "decode",
                generated_tokens = tracing::field::Empty,
                finish_reason = tracing::field::Empty,
            );
            self.phase = Phase::Decode(span);
        }
    }

    /// The request ended with `generated_tokens` for `reason` (spelt as TGI does).
    pub fn finish(&self, generated_tokens: u32, reason: pb::FinishReason) {
        if let Phase::Decode(span) = &self.phase {
            let reason = match reason {
                pb::FinishReason::Length => "length",
                pb::FinishReason::EosToken => "eos_token",
                pb::FinishReason::StopSequence => "stop_sequence",
            };
            span.record("generated_tokens", generated_tokens);
            span.record("finish_reason", reason);
        }
    }
}

/// The entries of a new batch by request id, and the batch to send to the shards.
pub type NextBatch = (HashMap<u64, Entry>, pb::Batch);

/// The queue's state; plain data, driven by the queue task (and directly by tests).
pub struct State {
    entries: VecDeque<(u64, Entry)>,
    next_id: u64,
    next_batch_id: u64,
    block_size: u32,
    allocator: BlockAllocator,
    support_chunking: bool,
}

impl State {
    pub fn new(allocator: BlockAllocator, support_chunking: bool) -> Self {
        Self {
            entries: VecDeque::with_capacity(128),
            next_id: 0,
            next_batch_id: 0,
            block_size: allocator.block_size(),
            allocator,
            support_chunking,
        }
    }

    /// Queues `entry` under the next request id.
    pub fn append(&mut self, entry: Entry) {
        self.entries.push_back((self.next_id, entry));
        self.next_id += 1;
        metrics::gauge!(QUEUE_SIZE).set(self.entries.len() as f64);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The next batch: at most `max_size` entries whose uncached prompt tokens fit
    /// `prefill_token_budget` and whose KV blocks can be allocated; `None` when fewer than
    /// `min_size` qualify (they stay queued, in order). `token_budget` is not checked here: for
    /// paged models the block allocator is the memory gate.
    pub fn next_batch(
        &mut self,
        min_size: Option<usize>,
        max_size: Option<usize>,
        prefill_token_budget: u32,
        _token_budget: u32,
    ) -> Option<NextBatch> {
        if self.entries.is_empty() || max_size == Some(0) {
            return None;
        }
        if min_size.is_some_and(|min| self.entries.len() < min) {
            return None;
        }
        let block_size = self.block_size;
        // As TGI: the budget is counted in whole blocks.
        let prefill_budget = prefill_token_budget.div_ceil(block_size) * block_size;
        let mut prefill_tokens: u32 = 0;
        let mut batch: Vec<Admitted> = Vec::new();

        while let Some((id, entry)) = self.entries.pop_front() {
            // The client went away while queued: nothing to compute.
            if entry.response_tx.is_closed() {
                metrics::counter!(REQUEST_FAILURE, "err" => "dropped").increment(1);
                continue;
            }
            let request = &entry.request;
            let input_len = request.input_ids.len() as u32;
            // The last generated token is never fed back, so it needs no slot.
            let tokens = (input_len + request.stopping.max_new_tokens).saturating_sub(1);
            // Prompt logprobs need every prompt token computed: no prefix reuse.
            let prefill_ids = (!request.decoder_input_details).then_some(&request.input_ids[..]);
            let Some(allocation) = self.allocator.allocate(tokens, prefill_ids) else {
                self.entries.push_front((id, entry));
                break;
            };
            let mut cache_len = allocation.prefix_len.min(input_len);
            // At least one prompt token must be computed to get logits for the first token.
            if cache_len == input_len {
                cache_len = cache_len.saturating_sub(1);
            }
            let postfix_len = input_len - cache_len;
            if prefill_tokens + postfix_len > prefill_budget {
                let chunk_len = prefill_budget.saturating_sub(prefill_tokens);
                if self.support_chunking && chunk_len > 0 {
                    // The rest of its prompt follows chunk by chunk in later steps.
                    batch.push(Admitted {
                        id,
                        entry,
                        allocation,
                        cache_len,
                        chunk_len: Some(chunk_len),
                    });
                } else {
                    // Dropping `allocation` gives its blocks back.
                    self.entries.push_front((id, entry));
                }
                break;
            }
            prefill_tokens += postfix_len;
            batch.push(Admitted {
                id,
                entry,
                allocation,
                cache_len,
                chunk_len: None,
            });
            if max_size == Some(batch.len()) {
                break;
            }
        }

        if batch.is_empty() || min_size.is_some_and(|min| batch.len() < min) {
            // Back in their original order; their allocations are dropped (freed).
            for a in batch.into_iter().rev() {
                self.entries.push_front((a.id, a.entry));
            }
            metrics::gauge!(QUEUE_SIZE).set(self.entries.len() as f64);
            return None;
        }

        let now = Instant::now();
        let batch_size = batch.len();
        let mut requests = Vec::with_capacity(batch.len());
        let mut entries = HashMap::with_capacity(batch.len());
        let mut max_blocks = 0u32;
        for Admitted {
            id,
            mut entry,
            allocation,
            cache_len,
            chunk_len,
        } in batch
        {
            let r = &entry.request;
            metrics::counter!(PREFIX_CACHE_HIT_TOKENS).increment(cache_len as u64);
            metrics::counter!(PREFIX_CACHE_PROMPT_TOKENS).increment(r.input_ids.len() as u64);
            max_blocks += allocation.blocks.len() as u32;
            requests.push(pb::Request {
                id,
                parameters: Some(pb::NextTokenChooserParameters {
                    temperature: r.parameters.temperature,
                    top_k: r.parameters.top_k,
                    top_p: r.parameters.top_p,
                    typical_p: r.parameters.typical_p,
                    do_sample: r.parameters.do_sample,
                    seed: r.parameters.seed,
                    repetition_penalty: r.parameters.repetition_penalty,
                    watermark: false,
                    frequency_penalty: r.parameters.frequency_penalty,
                    grammar: r
                        .parameters
                        .grammar
                        .as_ref()
                        .map(|g| g.text.clone())
                        .unwrap_or_default(),
                    grammar_type: r
                        .parameters
                        .grammar
                        .as_ref()
                        .map_or(pb::GrammarType::None, |g| g.kind)
                        as i32,
                    presence_penalty: r.parameters.presence_penalty,
                    logit_bias: r.parameters.logit_bias.iter().copied().collect(),
                }),
                stopping_parameters: Some(pb::StoppingCriteriaParameters {
                    max_new_tokens: r.stopping.max_new_tokens,
                    stop_sequences: r.stopping.stop_sequences.clone(),
                    ignore_eos_token: r.stopping.ignore_eos_token,
                    min_new_tokens: r.stopping.min_new_tokens,
                }),
                prefill_logprobs: r.decoder_input_details,
                top_n_tokens: r.top_n_tokens,
                blocks: allocation.blocks.clone(),
                cache_len,
                chunk_len,
                input_ids: r.input_ids.clone(),
            });
            entry.batch_time = Some(now);
            entry.block_allocation = Some(allocation);
            entry.start_prefill(batch_size, cache_len);
            entries.insert(id, entry);
        }
        let size = requests.len() as u32;
        let batch = pb::Batch {
            id: self.next_batch_id,
            requests,
            size,
            max_tokens: max_blocks * block_size,
            max_blocks,
        };
        self.next_batch_id += 1;
        metrics::histogram!(BATCH_NEXT_SIZE).record(size as f64);
        metrics::gauge!(QUEUE_SIZE).set(self.entries.len() as f64);
        Some((entries, batch))
    }
}

/// An entry that got its blocks, on its way into the batch.
struct Admitted {
    id: u64,
    entry: Entry,
    allocation: BlockAllocation,
    cache_len: u32,
    chunk_len: Option<u32>,
}

enum Command {
    Append(Box<Entry>),
    NextBatch {
        min_size: Option<usize>,
        max_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
        reply: oneshot::Sender<Option<NextBatch>>,
    },
}

/// Handle to the queue task; cloning shares the same queue.
#[derive(Clone)]
pub struct Queue {
    commands: mpsc::UnboundedSender<Command>,
    /// Entries appended and not yet taken out (batched or dropped): lets the batching loop skip
    /// the round trip on every step when nothing waits.
    len: Arc<AtomicUsize>,
}

impl Queue {
    /// Spawns the queue task owning `state` (needs a tokio runtime). The task ends when every
    /// handle is dropped.
    pub fn spawn(state: State) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let len = Arc::new(AtomicUsize::new(state.len()));
        tokio::spawn(queue_task(state, rx, len.clone()));
        Self { commands, len }
    }

    /// Queues `entry`. If the queue task is gone (shutdown), the entry is dropped and its
    /// stream simply ends.
    pub fn append(&self, entry: Entry) {
        self.len.fetch_add(1, Ordering::SeqCst);
        if self
            .commands
            .send(Command::Append(Box::new(entry)))
            .is_err()
        {
            self.len.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Entries waiting (appended, not yet batched or dropped).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// See [`State::next_batch`]; also `None` when either budget is 0 or nothing waits.
    pub async fn next_batch(
        &self,
        min_size: Option<usize>,
        max_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
    ) -> Option<NextBatch> {
        if prefill_token_budget == 0 || token_budget == 0 || self.is_empty() {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::NextBatch {
                min_size,
                max_size,
                prefill_token_budget,
                token_budget,
                reply,
            })
            .ok()?;
        answer.await.ok().flatten()
    }
}

async fn queue_task(
    mut state: State,
    mut commands: mpsc::UnboundedReceiver<Command>,
    len: Arc<AtomicUsize>,
) {
    while let Some(command) = commands.recv().await {
        match command {
            Command::Append(entry) => state.append(*entry),
            Command::NextBatch {
                min_size,
                max_size,
                prefill_token_budget,
                token_budget,
                reply,
            } => {
                let before = state.len();
                let next = state.next_batch(min_size, max_size, prefill_token_budget, token_budget);
                len.fetch_sub(before - state.len(), Ordering::SeqCst);
                // The batching loop went away: the entries drop and their streams end.
                let _ = reply.send(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ValidParameters, ValidStoppingParameters};
    use tokio::sync::mpsc::UnboundedReceiver;

    type Receiver = UnboundedReceiver<Result<InferStreamResponse, InferError>>;

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
                ignore_eos_token: false,
                min_new_tokens: 0,
            },
            top_n_tokens: 0,
            decoder_input_details: false,
        }
    }

    fn entry(input_len: u32, max_new_tokens: u32) -> (Entry, Receiver) {
        entry_with((0..input_len).collect(), max_new_tokens)
    }

    fn entry_with(input_ids: Vec<u32>, max_new_tokens: u32) -> (Entry, Receiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Entry::new(request(input_ids, max_new_tokens), tx), rx)
    }

    /// 1024 slots in blocks of 16 (63 usable blocks), chunking on.
    fn state() -> State {
        State::new(BlockAllocator::new(1024, 16, true), true)
    }

    fn ids(batch: &pb::Batch) -> Vec<u64> {
        batch.requests.iter().map(|r| r.id).collect()
    }

    #[test]
    fn empty_queue_gives_nothing() {
        let mut s = state();
        assert!(s.next_batch(None, None, 100, 100).is_none());
    }

    #[test]
    fn batches_are_fifo_with_increasing_ids() {
        let mut s = state();
        let mut rx = Vec::new();
        for _ in 0..3 {
            let (e, r) = entry(5, 4);
            s.append(e);
            rx.push(r);
        }
        let (entries, batch) = s.next_batch(None, Some(2), 1000, 1000).unwrap();
        assert_eq!(ids(&batch), vec![0, 1]);
        assert_eq!(batch.id, 0);
        assert_eq!(batch.size, 2);
        assert_eq!(entries.len(), 2);
        assert!(entries.values().all(|e| e.batch_time.is_some()));
        let r = &batch.requests[0];
        // 5 prompt + 4 new − 1 positions → 8 slots in one block.
        assert_eq!(r.blocks.len(), 1);
        assert_eq!(r.input_ids, (0..5).collect::<Vec<_>>());
        assert_eq!(r.cache_len, 0);
        assert_eq!(r.chunk_len, None);
        let (_, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(ids(&batch), vec![2]);
        assert_eq!(batch.id, 1);
        assert!(s.is_empty());
    }

    #[test]
    fn prefill_budget_stops_at_the_head_of_line_without_chunking() {
        let mut s = State::new(BlockAllocator::new(1024, 16, true), false);
        let mut rx = Vec::new();
        for len in [10, 10, 3] {
            let (e, r) = entry(len, 2);
            s.append(e);
            rx.push(r);
        }
        let free = s.allocator.free_blocks();
        // Budget 16 (one block): the second 10-token prompt does not fit, and the small one
        // behind it must not jump ahead.
        let (_running, batch) = s.next_batch(None, None, 16, 1000).unwrap();
        assert_eq!(ids(&batch), vec![0]);
        assert_eq!(s.len(), 2);
        // The pushed-back entry's blocks were returned.
        assert_eq!(s.allocator.free_blocks(), free - 1);
    }

    #[test]
    fn chunking_admits_the_part_of_a_prompt_that_fits() {
        let mut s = state();
        let mut rx = Vec::new();
        for len in [10, 40, 3] {
            let (e, r) = entry(len, 2);
            s.append(e);
            rx.push(r);
        }
        let (_, batch) = s.next_batch(None, None, 32, 1000).unwrap();
        assert_eq!(ids(&batch), vec![0, 1]);
        assert_eq!(batch.requests[0].chunk_len, None);
        assert_eq!(batch.requests[1].chunk_len, Some(22));
        // The chunked request still holds blocks for its whole prompt and output.
        // 40 + 2 − 1 = 41 positions: 3 blocks of 16.
        assert_eq!(batch.requests[1].blocks.len(), 3);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn an_exhausted_budget_is_not_chunked_to_zero() {
        let mut s = state();
        let mut rx = Vec::new();
        for len in [16, 5] {
            let (e, r) = entry(len, 2);
            s.append(e);
            rx.push(r);
        }
        let (_, batch) = s.next_batch(None, None, 16, 1000).unwrap();
        assert_eq!(ids(&batch), vec![0]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_budget_is_rounded_up_to_whole_blocks() {
        let mut s = state();
        let (e, _rx) = entry(16, 2);
        s.append(e);
        let (_, batch) = s.next_batch(None, None, 10, 1000).unwrap();
        assert_eq!(batch.requests[0].chunk_len, None);
    }

    #[test]
    fn fewer_than_min_size_are_pushed_back_in_order() {
        let mut s = state();
        let mut rx = Vec::new();
        for len in [10, 10, 10] {
            let (e, r) = entry(len, 2);
            s.append(e);
            rx.push(r);
        }
        let free = s.allocator.free_blocks();
        assert!(s.next_batch(Some(4), None, 1000, 1000).is_none());
        // A budget of 16 admits the first entry and a chunk of the second: fewer than 3.
        assert!(s.next_batch(Some(3), None, 16, 1000).is_none());
        assert_eq!(s.len(), 3);
        assert_eq!(s.allocator.free_blocks(), free);
        let (_, batch) = s.next_batch(Some(3), None, 1000, 1000).unwrap();
        assert_eq!(ids(&batch), vec![0, 1, 2]);
    }

    #[test]
    fn max_size_zero_gives_nothing() {
        let mut s = state();
        let (e, _rx) = entry(3, 2);
        s.append(e);
        assert!(s.next_batch(None, Some(0), 1000, 1000).is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn entries_whose_client_left_are_skipped() {
        let mut s = state();
        let (gone, gone_rx) = entry(3, 2);
        let (kept, _kept_rx) = entry(3, 2);
        s.append(gone);
        s.append(kept);
        drop(gone_rx);
        let (entries, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(ids(&batch), vec![1]);
        assert!(entries.contains_key(&1));
        assert!(s.is_empty());
    }

    #[test]
    fn memory_shortage_stops_the_batch() {
        // 3 usable blocks of 16.
        let mut s = State::new(BlockAllocator::new(64, 16, true), true);
        let mut rx = Vec::new();
        for (len, new) in [(20, 10), (20, 10), (2, 2)] {
            let (e, r) = entry(len, new);
            s.append(e);
            rx.push(r);
        }
        let (first, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(ids(&batch), vec![0]);
        assert_eq!(s.len(), 2);
        // Nothing more fits until the first batch's blocks are freed.
        assert!(s.next_batch(None, None, 1000, 1000).is_none());
        drop(first);
        let (_, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(ids(&batch), vec![1, 2]);
    }

    #[test]
    fn a_repeated_prompt_reuses_the_cached_prefix() {
        let mut s = state();
        let prompt: Vec<u32> = (100..140).collect(); // 40 tokens: 2 whole blocks
        let (e, _rx1) = entry_with(prompt.clone(), 4);
        s.append(e);
        let (mut entries, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(batch.requests[0].cache_len, 0);
        // The shard computed the prompt, then the request finished.
        let mut done = entries.remove(&0).unwrap();
        done.block_allocation
            .as_mut()
            .unwrap()
            .mark_prompt_computed();
        let cached_blocks = done.block_allocation.as_ref().unwrap().blocks[..2].to_vec();
        drop(done);

        let (e, _rx2) = entry_with(prompt.clone(), 4);
        s.append(e);
        let (_, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(batch.requests[0].cache_len, 32);
        assert_eq!(batch.requests[0].blocks[..2], cached_blocks[..]);

        // A prompt made only of cached blocks still computes its last token.
        let (e, _rx3) = entry_with(prompt[..32].to_vec(), 4);
        s.append(e);
        let (_, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(batch.requests[0].cache_len, 31);

        // Prompt logprobs need the whole prompt computed.
        let (mut e, _rx4) = entry_with(prompt.clone(), 4);
        e.request.decoder_input_details = true;
        s.append(e);
        let (_, batch) = s.next_batch(None, None, 1000, 1000).unwrap();
        assert_eq!(batch.requests[0].cache_len, 0);
        assert!(batch.requests[0].prefill_logprobs);
    }

    #[test]
    fn cached_tokens_do_not_count_against_the_prefill_budget() {
        let mut s = state();
        let prompt: Vec<u32> = (0..40).collect();
        let (e, _rx) = entry_with(prompt.clone(), 2);
        s.append(e);
        let (mut entries, _) = s.next_batch(None, None, 1000, 1000).unwrap();
        let mut done = entries.remove(&0).unwrap();
        done.block_allocation
            .as_mut()
            .unwrap()
            .mark_prompt_computed();
        drop(done);
        let (e, _rx) = entry_with(prompt, 2);
        s.append(e);
        // 8 uncached tokens fit a budget of 16 without chunking.
        let (_, batch) = s.next_batch(None, None, 16, 1000).unwrap();
        assert_eq!(batch.requests[0].cache_len, 32);
        assert_eq!(batch.requests[0].chunk_len, None);
    }

    #[tokio::test]
    async fn the_queue_task_serves_batches_and_counts_waiting_entries() {
        let queue = Queue::spawn(state());
        assert!(queue.next_batch(None, None, 100, 100).await.is_none());
        let (e, _rx) = entry(3, 2);
        queue.append(e);
        assert_eq!(queue.len(), 1);
        assert!(queue.next_batch(None, None, 0, 100).await.is_none());
        let (entries, batch) = queue.next_batch(None, None, 100, 100).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(batch.size, 1);
        assert_eq!(queue.len(), 0);
    }
}
