//! The sharded gRPC client: every call goes to all ranks at once (they step in lock-step over
//! their collective backend), generations come from rank 0, limits are the minimum over ranks.

use std::future::Future;
use std::sync::Arc;

use futures::future::try_join_all;
use wick_proto::v1 as pb;
use wick_proto::ShardClient;

/// Why a shard call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the shard: {0}")]
    Connection(String),
    /// The shard answered with an error status (or the transport broke mid-call), with its
    /// gRPC code.
    #[error("{message}")]
    Status { code: tonic::Code, message: String },
    #[error("the shard sent an empty answer: {0}")]
    EmptyResponse(&'static str),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        Self::Status {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A prefill or decode answer's generations, batch and timings (`pb::PrefillResponse` and
/// `pb::DecodeResponse` have the same fields).
macro_rules! step_answer {
    ($a:expr) => {{
        let a = $a;
        let timings = StepTimings {
            forward_ns: a.forward_ns,
            linear_ns: a.linear_ns,
            attention_ns: a.attention_ns,
            decode_ns: a.decode_ns,
            total_ns: a.total_ns,
            concat_ns: a.concat_ns,
            idle_ns: a.idle_ns,
        };
        (a.generations, a.batch, timings)
    }};
}

/// Shard timings of one step (the slowest rank's), in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimings {
    pub forward_ns: u64,
    /// The parts of `forward_ns` in the linear layers and in attention.
    pub linear_ns: u64,
    pub attention_ns: u64,
    pub decode_ns: u64,
    pub total_ns: u64,
    pub concat_ns: Option<u64>,
    /// How long the shard waited for this step after its previous one.
    pub idle_ns: Option<u64>,
}

impl StepTimings {
    fn max(self, other: Self) -> Self {
        Self {
            forward_ns: self.forward_ns.max(other.forward_ns),
            linear_ns: self.linear_ns.max(other.linear_ns),
            attention_ns: self.attention_ns.max(other.attention_ns),
            decode_ns: self.decode_ns.max(other.decode_ns),
            total_ns: self.total_ns.max(other.total_ns),
            concat_ns: self.concat_ns.max(other.concat_ns),
            idle_ns: self.idle_ns.max(other.idle_ns),
        }
    }
}

/// What a prefill or decode step returns: rank 0's generations, the batch still running on the
/// shards (`None` when every request finished) and the step's timings.
pub type StepResult = (Vec<pb::Generation>, Option<pb::CachedBatch>, StepTimings);

/// The limits warmup found (the minimum over ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLimits {
    /// KV token slots the shards hold; `None` when a shard cannot tell.
    pub max_supported_total_tokens: Option<u32>,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
}

/// One client per rank; cloning shares the underlying connections.
#[derive(Clone, Debug)]
pub struct ShardedClient {
    clients: Vec<ShardClient>,
    /// Held through every call that touches the shards' batches: tensor-parallel ranks must
    /// see those calls in the same order (a health check's prefill must not interleave
    /// differently with the batching loop's steps on different ranks).
    steps: Arc<tokio::sync::Mutex<()>>,
}

impl ShardedClient {
    /// Connects to the master shard's socket, asks it for every rank's socket and connects to
    /// all of them.
    pub async fn connect_uds(master: &std::path::Path) -> Result<Self> {
        let mut master = wick_proto::connect_uds(master)
            .await
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let urls = master
            .service_discovery(pb::ServiceDiscoveryRequest {})
            .await?
            .into_inner()
            .urls;
        if urls.is_empty() {
            return Err(ClientError::EmptyResponse(
                "service discovery listed no shard",
            ));
        }
        let clients = try_join_all(urls.iter().map(|url| async move {
            // `connect_uds` strips the `unix://` scheme itself.
            wick_proto::connect_uds(url)
                .await
                .map_err(|e| ClientError::Connection(format!("{url}: {e}")))
        }))
        .await?;
        Ok(Self {
            clients,
            steps: Arc::default(),
        })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.clients.len()
    }

    /// Runs `call` on every rank at once with its own copy of `request`; the results come in
    /// rank order. The last rank gets `request` itself, so a single shard costs no copy.
    async fn all<Req, T, F, Fut>(&self, request: Req, call: F) -> Result<Vec<T>>
    where
        Req: Clone,
        F: Fn(ShardClient, Req) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.clients.len();
        let mut request = Some(request);
        let calls = self.clients.iter().enumerate().map(|(rank, client)| {
            let req = if rank + 1 == n {
                request
                    .take()
                    .expect("the last rank takes the request once")
            } else {
                request
                    .clone()
                    .expect("the request is kept until the last rank")
            };
            // A tonic client is a cheap handle over a shared channel.
            let fut = call(client.clone(), req);
            async move { fut.await.map(tonic::Response::into_inner) }
        });
        Ok(try_join_all(calls).await?)
    }

    /// Rank 0's `Info`, with the KV blocks every rank holds (the fewest of any rank: the
    /// router allocates blocks for all ranks at once).
    pub async fn info(&self) -> Result<pb::InfoResponse> {
        let infos = self
            .all(
                pb::InfoRequest {},
                |mut c, r| async move { c.info(r).await },
            )
            .await?;
        let num_blocks = infos.iter().map(|i| i.num_blocks).min();
        let mut info = infos
            .into_iter()
            .next()
            .ok_or(ClientError::EmptyResponse("info"))?;
        info.num_blocks = num_blocks.unwrap_or(0);
        Ok(info)
    }

    pub async fn health(&self) -> Result<()> {
        self.all(
            pb::HealthRequest {},
            |mut c, r| async move { c.health(r).await },
        )
        .await?;
        Ok(())
    }

    /// Drops batch `id` on every rank, or every batch when `id` is `None`.
    pub async fn clear_cache(&self, id: Option<u64>) -> Result<()> {
        let _order = self.steps.lock().await;
        self.all(pb::ClearCacheRequest { id }, |mut c, r| async move {
            c.clear_cache(r).await
        })
        .await?;
        Ok(())
    }

    /// Keeps only `request_ids` of batch `batch_id`; `None` when none remain.
    pub async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>> {
        let request = pb::FilterBatchRequest {
            batch_id,
            request_ids,
        };
        let _order = self.steps.lock().await;
        let mut answers = self
            .all(request, |mut c, r| async move { c.filter_batch(r).await })
            .await?;
        Ok(answers.swap_remove(0).batch)
    }

    /// Runs the warmup batch; the limits are the minimum over ranks.
    pub async fn warmup(&self, request: pb::WarmupRequest) -> Result<ShardLimits> {
        let _order = self.steps.lock().await;
        let answers = self
            .all(request, |mut c, r| async move { c.warmup(r).await })
            .await?;
        let limits = answers
            .into_iter()
            .map(|a| ShardLimits {
                max_supported_total_tokens: a.max_supported_total_tokens,
                max_input_tokens: a.max_input_tokens,
                max_total_tokens: a.max_total_tokens,
            })
            .reduce(|a, b| ShardLimits {
                max_supported_total_tokens: match (
                    a.max_supported_total_tokens,
                    b.max_supported_total_tokens,
                ) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                },
                max_input_tokens: a.max_input_tokens.min(b.max_input_tokens),
                max_total_tokens: a.max_total_tokens.min(b.max_total_tokens),
            });
        limits.ok_or(ClientError::EmptyResponse("warmup"))
    }

    /// Starts `batch`; with `cached_batch`, its running requests step in the same forward pass.
    /// With `run_ahead`, the shards compute the returned batch's next decode as soon as they
    /// have answered (see `pb::DecodeRequest::run_ahead`).
    pub async fn prefill(
        &self,
        batch: pb::Batch,
        cached_batch: Option<pb::CachedBatch>,
        run_ahead: bool,
    ) -> Result<StepResult> {
        let request = pb::PrefillRequest {
            batch: Some(batch),
            cached_batch,
            run_ahead,
        };
        let _order = self.steps.lock().await;
        let answers = self
            .all(request, |mut c, r| async move { c.prefill(r).await })
            .await?;
        Ok(merge(answers.into_iter().map(|a| step_answer!(a))))
    }

    /// One step of every request of `batches` (merged into the first on the shards); see
    /// [`ShardedClient::prefill`] for `run_ahead`.
    pub async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
        run_ahead: bool,
    ) -> Result<StepResult> {
        let _order = self.steps.lock().await;
        let request = pb::DecodeRequest { batches, run_ahead };
        let answers = self
            .all(request, |mut c, r| async move { c.decode(r).await })
            .await?;
        Ok(merge(answers.into_iter().map(|a| step_answer!(a))))
    }
}

/// Rank 0's generations and batch with the slowest rank's timings.
fn merge(mut answers: impl Iterator<Item = StepResult>) -> StepResult {
    let Some((generations, batch, mut timings)) = answers.next() else {
        return (Vec::new(), None, StepTimings::default());
    };
    for (_, _, t) in answers {
        timings = timings.max(t);
    }
    (generations, batch, timings)
}
