//! What every generation route shares: admission (permit before validation, as TGI), validation
//! with its metrics, running a request to its end, and the per-request metrics at the end.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::field::Empty;
use tracing::Instrument;

use super::AppState;
use crate::error::ApiError;
use crate::types::GenerateParameters;
use crate::validation::ValidGenerateRequest;
use wick_scheduler::infer::EventStream;
use wick_scheduler::metrics;
use wick_scheduler::request::{GeneratedText, InferError, InferStreamResponse, Token};

/// A validated request holding its concurrency permit, not yet queued.
pub(crate) struct Permitted {
    pub permit: OwnedSemaphorePermit,
    pub valid: ValidGenerateRequest,
    /// When the HTTP request arrived.
    pub arrived: Instant,
    pub validation_time: Duration,
}

/// Counts the request, takes a permit (429 at once when none is free), validates.
pub(crate) async fn admit(
    state: &AppState,
    inputs: &str,
    add_special_tokens: bool,
    parameters: &GenerateParameters,
    stream: bool,
) -> Result<Permitted, ApiError> {
    let arrived = Instant::now();
    ::metrics::counter!(metrics::REQUEST_COUNT).increment(1);
    let permit = state.infer.try_acquire_permit()?;
    let span = tracing::info_span!("validation", input_tokens = Empty, max_new_tokens = Empty);
    let valid = state
        .validation
        .validate(inputs, add_special_tokens, parameters, stream)
        .instrument(span.clone())
        .await?;
    span.record("input_tokens", valid.input_length);
    span.record("max_new_tokens", valid.request.stopping.max_new_tokens);
    let validation_time = arrived.elapsed();
    ::metrics::histogram!(metrics::REQUEST_VALIDATION_DURATION)
        .record(validation_time.as_secs_f64());
    ::metrics::histogram!(metrics::REQUEST_INPUT_LENGTH).record(f64::from(valid.input_length));
    ::metrics::histogram!(metrics::REQUEST_MAX_NEW_TOKENS)
        .record(f64::from(valid.request.stopping.max_new_tokens));
    Ok(Permitted {
        permit,
        valid,
        arrived,
        validation_time,
    })
}

/// Takes `n` more permits for copies of an admitted request (OpenAI's `n`), all or nothing.
pub(crate) fn acquire_more(
    state: &AppState,
    n: usize,
) -> Result<Vec<OwnedSemaphorePermit>, ApiError> {
    (0..n)
        .map(|_| {
            ::metrics::counter!(metrics::REQUEST_COUNT).increment(1);
            state.infer.try_acquire_permit().map_err(ApiError::from)
        })
        .collect()
}

/// Timings of a finished request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    pub total: Duration,
    pub validation: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub per_token: Duration,
}

impl Timings {
    pub fn new(
        arrived: Instant,
        validation: Duration,
        queued: Instant,
        start: Instant,
        generated: u32,
    ) -> Self {
        let now = Instant::now();
        let inference = now.saturating_duration_since(start);
        Timings {
            total: now.saturating_duration_since(arrived),
            validation,
            queue: start.saturating_duration_since(queued),
            inference,
            per_token: inference / generated.max(1),
        }
    }

    /// `tgi_request_success` and the duration histograms.
    pub fn record_success(&self, generated_tokens: u32) {
        ::metrics::counter!(metrics::REQUEST_SUCCESS).increment(1);
        ::metrics::histogram!(metrics::REQUEST_DURATION).record(self.total.as_secs_f64());
        ::metrics::histogram!(metrics::REQUEST_QUEUE_DURATION).record(self.queue.as_secs_f64());
        ::metrics::histogram!(metrics::REQUEST_INFERENCE_DURATION)
            .record(self.inference.as_secs_f64());
        ::metrics::histogram!(metrics::REQUEST_MEAN_TIME_PER_TOKEN_DURATION)
            .record(self.per_token.as_secs_f64());
        ::metrics::histogram!(metrics::REQUEST_GENERATED_TOKENS)
            .record(f64::from(generated_tokens));
    }
}

/// Everything a request produced, for the non-stream answers.
#[derive(Debug, Clone)]
pub(crate) struct Completed {
    pub input_length: u32,
    pub seed: u64,
    pub sampled: bool,
    pub prefill: Vec<Token>,
    pub tokens: Vec<Token>,
    pub top_tokens: Vec<Vec<Token>>,
    pub generated: GeneratedText,
    pub timings: Timings,
}

/// Queues an admitted request and returns its event stream (ended by the deployment's
/// deadline, if it has one).
pub(crate) fn start(state: &AppState, admitted: Permitted) -> Result<EventStream, ApiError> {
    let events = state
        .infer
        .generate_stream(admitted.permit, admitted.valid.request)?;
    let events = time_first_token(events, admitted.arrived);
    Ok(match state.request_deadline {
        Some(limit) => with_deadline(events, admitted.arrived + limit, limit),
        None => events,
    })
}

/// `events`, recording the time from `arrived` to the first generated token as it passes.
fn time_first_token(events: EventStream, arrived: Instant) -> EventStream {
    let mut first = true;
    Box::pin(events.inspect(move |event| {
        let token = matches!(
            event,
            Ok(InferStreamResponse::Intermediate { .. } | InferStreamResponse::End { .. })
        );
        if first && token {
            first = false;
            ::metrics::histogram!(metrics::REQUEST_FIRST_TOKEN_DURATION)
                .record(arrived.elapsed().as_secs_f64());
        }
    }))
}

/// `events` until `until`: then one `DeadlineExceeded` error and the end (dropping `events`
/// cancels the request, so its KV blocks and batch slot are freed at the next step).
fn with_deadline(events: EventStream, until: std::time::Instant, limit: Duration) -> EventStream {
    let timer = Box::pin(tokio::time::sleep_until(until.into()));
    Box::pin(futures::stream::unfold(
        Some((events, timer)),
        move |state| async move {
            let (mut events, mut timer) = state?;
            tokio::select! {
                biased;
                item = events.next() => item.map(|item| (item, Some((events, timer)))),
                _ = &mut timer => Some((Err(InferError::DeadlineExceeded(limit)), None)),
            }
        },
    ))
}

/// Runs an admitted request to its end.
pub(crate) async fn run_to_end(
    state: &AppState,
    admitted: Permitted,
) -> Result<Completed, ApiError> {
    let arrived = admitted.arrived;
    let validation_time = admitted.validation_time;
    let input_length = admitted.valid.input_length;
    let seed = admitted.valid.request.parameters.seed;
    let sampled = admitted.valid.request.parameters.do_sample;
    let mut stream = start(state, admitted)?;
    let mut prefill = Vec::new();
    let mut tokens = Vec::new();
    let mut top_tokens = Vec::new();
    while let Some(event) = stream.next().await {
        match event? {
            InferStreamResponse::Prefill(p) => prefill = p,
            InferStreamResponse::Intermediate {
                token,
                top_tokens: top,
            } => {
                tokens.push(token);
                top_tokens.push(top);
            }
            InferStreamResponse::End {
                token,
                top_tokens: top,
                generated_text,
                queued,
                start,
            } => {
                tokens.push(token);
                top_tokens.push(top);
                let timings = Timings::new(
                    arrived,
                    validation_time,
                    queued,
                    start,
                    generated_text.generated_tokens,
                );
                timings.record_success(generated_text.generated_tokens);
                return Ok(Completed {
                    input_length,
                    seed,
                    sampled,
                    prefill,
                    tokens,
                    top_tokens,
                    generated: generated_text,
                    timings,
                });
            }
        }
    }
    Err(InferError::IncompleteGeneration.into())
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A unique id with OpenAI's prefix (`chatcmpl-…`, `cmpl-…`).
pub(crate) fn unique_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:016x}",
        crate::validation::random_seed(),
        crate::validation::random_seed()
    )
}
