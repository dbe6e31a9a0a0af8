//! The scheduler's front door: a validated request ([`crate::request`]) goes in, a stream of
//! its events comes out. The HTTP edge sees only the [`Backend`] contract; [`Infer`] fulfils it
//! with everything below (queue, block allocator, radix prefix cache, batching loop, sharded
//! gRPC client).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{BoxStream, Stream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use wick_proto::v1 as pb;

use crate::block_allocator::BlockAllocator;
use crate::client::ShardedClient;
use crate::queue::{Entry, Queue};
use crate::request::{InferError, InferStreamResponse, ValidRequest};

/// A request's events, in order (see [`InferStreamResponse`]); dropping it cancels the request.
pub type EventStream = BoxStream<'static, Result<InferStreamResponse, InferError>>;

/// What the HTTP edge needs from whatever generates (TGI's `Backend`): admission under a
/// concurrency limit, generation of a validated request as a stream of events, and health.
pub trait Backend: Send + Sync {
    /// Non-blocking: `Err(Overloaded)` when the concurrency limit is reached.
    fn try_acquire_permit(&self) -> Result<OwnedSemaphorePermit, InferError>;

    /// Starts `request`; the permit is held as long as the stream lives.
    fn generate_stream(
        &self,
        permit: OwnedSemaphorePermit,
        request: ValidRequest,
    ) -> Result<EventStream, InferError>;

    /// Whether the backend can generate now.
    fn health(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;

    /// Concurrency permits held now: requests admitted and not yet answered or dropped.
    fn requests_in_flight(&self) -> usize {
        0
    }
}

impl Backend for Infer {
    /// `Err(Overloaded)` when `max_concurrent_requests` are in flight.
    fn try_acquire_permit(&self) -> Result<OwnedSemaphorePermit, InferError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| InferError::Overloaded)
    }

    /// Queues the request; the stream yields its events; dropping the stream cancels it (its KV
    /// blocks are freed and the shard batch is filtered at the next step). The permit is held
    /// as long as the stream lives.
    ///
    /// `request` passed validation, which guarantees what the scheduler relies on: at least
    /// one prompt token and one new token, and no more positions than the KV pool holds
    /// (validation's `max_total_tokens` is capped to the pool at startup). They are asserted
    /// here, not checked again.
    fn generate_stream(
        &self,
        permit: OwnedSemaphorePermit,
        request: ValidRequest,
    ) -> Result<EventStream, InferError> {
        debug_assert!(
            !request.input_ids.is_empty() && request.stopping.max_new_tokens > 0,
            "a validated request has a prompt token and a new token"
        );
        debug_assert!(
            {
                let positions = request.input_ids.len() + request.stopping.max_new_tokens as usize;
                (positions - 1).div_ceil(self.allocator.block_size() as usize)
                    <= self.allocator.total_blocks()
            },
            "a validated request fits the KV pool"
        );
        let (response_tx, response_rx) = mpsc::unbounded_channel();
        self.queue.append(Entry::new(request, response_tx));
        self.notifier.notify_one();
        Ok(Box::pin(ResponseStream {
            events: response_rx,
            _permit: permit,
        }))
    }

    fn health(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(Infer::health(self))
    }

    fn requests_in_flight(&self) -> usize {
        self.max_concurrent_requests
            .saturating_sub(self.permits.available_permits())
    }
}

/// Request and batch id of the health check's liveness prefill; it writes into the reserved
/// block 0, so it never disturbs running requests.
const LIVENESS_ID: u64 = u64::MAX;

/// The scheduler's front door: admission (concurrency permits), queueing, health. Cloning
/// shares the same queue and batching loop.
#[derive(Clone)]
pub struct Infer {
    queue: Queue,
    /// Wakes the batching loop when a request is queued.
    notifier: Arc<Notify>,
    permits: Arc<Semaphore>,
    max_concurrent_requests: usize,
    /// False after a shard error, until a health check proves a forward pass works again.
    backend_health: Arc<AtomicBool>,
    client: ShardedClient,
    allocator: BlockAllocator,
    /// Prompt of the liveness prefill: any token of the vocabulary.
    liveness_token: u32,
}

impl Infer {
    pub(crate) fn new(
        queue: Queue,
        notifier: Arc<Notify>,
        max_concurrent_requests: usize,
        backend_health: Arc<AtomicBool>,
        client: ShardedClient,
        allocator: BlockAllocator,
        liveness_token: u32,
    ) -> Self {
        Self {
            queue,
            notifier,
            permits: Arc::new(Semaphore::new(max_concurrent_requests)),
            max_concurrent_requests,
            backend_health,
            client,
            allocator,
            liveness_token,
        }
    }

    /// True when the shards answer `Health`; after a shard error, only once a one-token
    /// prefill (into the reserved block 0) succeeds again.
    pub async fn health(&self) -> bool {
        let healthy = if self.backend_health.load(Ordering::SeqCst) {
            self.client.health().await.is_ok()
        } else {
            self.liveness_prefill().await
        };
        self.backend_health.store(healthy, Ordering::SeqCst);
        healthy
    }

    async fn liveness_prefill(&self) -> bool {
        let block_size = self.allocator.block_size();
        let request = pb::Request {
            id: LIVENESS_ID,
            input_ids: vec![self.liveness_token],
            parameters: Some(pb::NextTokenChooserParameters::default()),
            stopping_parameters: Some(pb::StoppingCriteriaParameters {
                max_new_tokens: 1,
                stop_sequences: Vec::new(),
                ignore_eos_token: false,
                min_new_tokens: 0,
            }),
            blocks: vec![0],
            ..Default::default()
        };
        let batch = pb::Batch {
            id: LIVENESS_ID,
            requests: vec![request],
            size: 1,
            max_tokens: block_size,
            max_blocks: 1,
        };
        match self.client.prefill(batch, None, false).await {
            Ok((_, None, _)) => true,
            // A one-token request finishes at once; should anything be left, it is cleared.
            Ok((_, Some(_), _)) => self.client.clear_cache(Some(LIVENESS_ID)).await.is_ok(),
            Err(e) => {
                tracing::warn!(error = %e, "liveness prefill failed");
                // The shard keeps a failed batch for the caller to clear.
                let _ = self.client.clear_cache(Some(LIVENESS_ID)).await;
                false
            }
        }
    }

    /// KV blocks a new request could get now (free, or held only by the prefix cache).
    pub fn free_kv_blocks(&self) -> usize {
        self.allocator.free_blocks()
    }

    /// Usable KV blocks of the pool.
    pub fn total_kv_blocks(&self) -> usize {
        self.allocator.total_blocks()
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }
}

/// A request's events; holds its concurrency permit until dropped.
struct ResponseStream {
    events: mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>,
    _permit: OwnedSemaphorePermit,
}

impl Stream for ResponseStream {
    type Item = Result<InferStreamResponse, InferError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}
