//! TGI's native routes: `/generate`, `/generate_stream`, `/` (compat) and `/tokenize`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::generation::{admit, run_to_end, start, Completed, Timings};
use super::sse::{self, EventSender};
use super::AppState;
use crate::error::{ApiError, ApiJson, HttpError};
use crate::types::{
    CompatGenerateRequest, Details, ErrorResponse, FinishReason, GenerateRequest, GenerateResponse,
    PrefillToken, SimpleToken, StreamDetails, StreamEvent, StreamResponse, Token, TokenizeRequest,
};
use wick_scheduler::request::{InferError, InferStreamResponse};

/// Generate tokens.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "Text Generation Inference",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated Text", body = GenerateResponse),
        (status = 400, description = "Body is not valid JSON or not of this shape", body = ErrorResponse),
        (status = 413, description = "Body larger than --payload-limit", body = ErrorResponse),
        (status = 415, description = "No `Content-Type: application/json`", body = ErrorResponse),
        (status = 422, description = "Input validation error", body = ErrorResponse),
        (status = 424, description = "Generation Error", body = ErrorResponse),
        (status = 429, description = "Model is overloaded", body = ErrorResponse),
    )
)]
pub(crate) async fn generate(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<GenerateRequest>,
) -> Result<Response, HttpError> {
    let (headers, body) = generate_one(&state, request)
        .await
        .map_err(HttpError::native)?;
    Ok((headers, Json(body)).into_response())
}

/// Generate tokens as a stream of server-sent events (no `[DONE]`). A refused request gets its
/// HTTP status; an error once events have started arrives as an error event.
#[utoipa::path(
    post,
    path = "/generate_stream",
    tag = "Text Generation Inference",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Server-sent events: tokens, then the final event; an error after the first event arrives as an error event", body = StreamEvent, content_type = "text/event-stream"),
        (status = 400, description = "Body is not valid JSON or not of this shape", body = ErrorResponse),
        (status = 413, description = "Body larger than --payload-limit", body = ErrorResponse),
        (status = 415, description = "No `Content-Type: application/json`", body = ErrorResponse),
        (status = 422, description = "Input validation error", body = ErrorResponse),
        (status = 424, description = "Generation Error", body = ErrorResponse),
        (status = 429, description = "Model is overloaded", body = ErrorResponse),
    )
)]
pub(crate) async fn generate_stream(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<GenerateRequest>,
) -> Result<Response, HttpError> {
    stream_response(state, request)
        .await
        .map_err(HttpError::native)
}

/// TGI's compat route: like `/generate` but answers a one-element array, or streams when
/// `stream` is true. `return_full_text` defaults to true (a text-generation model).
#[utoipa::path(
    post,
    path = "/",
    tag = "Text Generation Inference",
    request_body = CompatGenerateRequest,
    responses(
        (status = 200, description = "Generated Text (one element), or server-sent events with `stream: true`", content(
            (Vec<GenerateResponse> = "application/json"),
            (StreamEvent = "text/event-stream"),
        )),
        (status = 400, description = "Body is not valid JSON or not of this shape", body = ErrorResponse),
        (status = 413, description = "Body larger than --payload-limit", body = ErrorResponse),
        (status = 415, description = "No `Content-Type: application/json`", body = ErrorResponse),
        (status = 422, description = "Input validation error", body = ErrorResponse),
        (status = 424, description = "Generation Error", body = ErrorResponse),
        (status = 429, description = "Model is overloaded", body = ErrorResponse),
    )
)]
pub(crate) async fn compat_generate(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CompatGenerateRequest>,
) -> Result<Response, HttpError> {
    let stream = request.stream;
    let mut parameters = request.parameters;
    parameters.return_full_text.get_or_insert(true);
    let request = GenerateRequest {
        inputs: request.inputs,
        parameters,
        add_special_tokens: true,
    };
    if stream {
        return stream_response(state, request)
            .await
            .map_err(HttpError::native);
    }
    let (headers, body) = generate_one(&state, request)
        .await
        .map_err(HttpError::native)?;
    Ok((headers, Json(vec![body])).into_response())
}

/// Tokenize the inputs: ids, texts and byte offsets.
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "Text Generation Inference",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "Tokenized ids", body = Vec<SimpleToken>),
        (status = 400, description = "Body is not valid JSON or not of this shape", body = ErrorResponse),
        (status = 413, description = "Body larger than --payload-limit", body = ErrorResponse),
        (status = 415, description = "No `Content-Type: application/json`", body = ErrorResponse),
        (status = 422, description = "Input validation error", body = ErrorResponse),
    )
)]
pub(crate) async fn tokenize(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TokenizeRequest>,
) -> Result<Json<Vec<SimpleToken>>, HttpError> {
    let encoding = state
        .validation
        .tokenize(request.inputs.clone(), request.add_special_tokens)
        .await
        .map_err(HttpError::native)?;
    let tokens = encoding
        .get_ids()
        .iter()
        .zip(encoding.get_offsets())
        .map(|(&id, &(start, stop))| SimpleToken {
            id,
            text: request
                .inputs
                .get(start..stop)
                .unwrap_or_default()
                .to_string(),
            start,
            stop,
        })
        .collect();
    Ok(Json(tokens))
}

async fn generate_one(
    state: &AppState,
    request: GenerateRequest,
) -> Result<(HeaderMap, GenerateResponse), ApiError> {
    let parameters = &request.parameters;
    let admitted = admit(
        state,
        &request.inputs,
        request.add_special_tokens,
        parameters,
        false,
    )
    .await?;
    let finished = run_to_end(state, admitted).await?;
    let headers = generate_headers(state, &request.inputs, &finished);
    let mut generated_text = finished.generated.text.clone();
    if parameters.return_full_text == Some(true) {
        generated_text.insert_str(0, &request.inputs);
    }
    let details = parameters
        .details
        .then(|| details(&finished, parameters.decoder_input_details));
    Ok((
        headers,
        GenerateResponse {
            generated_text,
            details,
        },
    ))
}

fn details(finished: &Completed, with_prefill: bool) -> Details {
    let prefill = if with_prefill {
        finished
            .prefill
            .iter()
            .map(|t| PrefillToken {
                id: t.id,
                text: t.text.clone(),
                logprob: (!t.logprob.is_nan()).then_some(t.logprob),
            })
            .collect()
    } else {
        Vec::new()
    };
    let top_tokens = if finished.top_tokens.iter().all(Vec::is_empty) {
        Vec::new()
    } else {
        finished
            .top_tokens
            .iter()
            .map(|top| top.iter().cloned().map(Token::from).collect())
            .collect()
    };
    Details {
        finish_reason: finished.generated.finish_reason.into(),
        generated_tokens: finished.generated.generated_tokens,
        seed: finished.sampled.then_some(finished.seed),
        prefill,
        tokens: finished.tokens.iter().cloned().map(Token::from).collect(),
        top_tokens,
    }
}

/// TGI's timing and size headers of a non-stream answer.
pub(crate) fn generate_headers(state: &AppState, inputs: &str, finished: &Completed) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-compute-type", state.compute_type.clone());
    timing_headers(
        &mut headers,
        &finished.timings,
        inputs.chars().count(),
        finished.input_length,
        finished.generated.generated_tokens,
    );
    headers
}

/// Inserts the `x-*` timing headers (times in ms except `x-compute-time`, in s).
pub(crate) fn timing_headers(
    headers: &mut HeaderMap,
    t: &Timings,
    characters: usize,
    prompt_tokens: u32,
    generated_tokens: u32,
) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    put("x-compute-time", t.total.as_secs_f64().to_string());
    put("x-compute-characters", characters.to_string());
    put("x-total-time", t.total.as_millis().to_string());
    put("x-validation-time", t.validation.as_millis().to_string());
    put("x-queue-time", t.queue.as_millis().to_string());
    put("x-inference-time", t.inference.as_millis().to_string());
    put("x-time-per-token", t.per_token.as_millis().to_string());
    put("x-prompt-tokens", prompt_tokens.to_string());
    put("x-generated-tokens", generated_tokens.to_string());
}

/// Validates and queues the request, then answers with its stream: a request refused
/// (validation, overload) gets its HTTP status before any event; an error after the first
/// event arrives in-band.
async fn stream_response(state: AppState, request: GenerateRequest) -> Result<Response, ApiError> {
    let admitted = admit(
        &state,
        &request.inputs,
        request.add_special_tokens,
        &request.parameters,
        true,
    )
    .await?;
    let admission = Admission {
        arrived: admitted.arrived,
        validation_time: admitted.validation_time,
        input_length: admitted.valid.input_length,
        do_sample: admitted.valid.request.parameters.do_sample,
        seed: admitted.valid.request.parameters.seed,
    };
    let events = start(&state, admitted)?;
    let (tx, response) = sse::channel(state.compute_type.clone());
    // The stream outlives the handler: it carries the request's span on.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        if let Err(error) = stream_events(&request, admission, events, &tx).await {
            error.record();
            tx.json(&error.native_body()).await;
        }
    }));
    Ok(response)
}

/// What a stream's last event reports about its admission.
struct Admission {
    arrived: std::time::Instant,
    validation_time: std::time::Duration,
    input_length: u32,
    do_sample: bool,
    seed: u64,
}

/// Sends one event per token; the last carries the text (and details). Returns the error to
/// report in-band.
async fn stream_events(
    request: &GenerateRequest,
    admission: Admission,
    mut events: wick_scheduler::infer::EventStream,
    tx: &EventSender,
) -> Result<(), ApiError> {
    let parameters = &request.parameters;
    let Admission {
        arrived,
        validation_time,
        input_length,
        ..
    } = admission;
    let mut index = 0u32;
    while let Some(event) = events.next().await {
        match event? {
            InferStreamResponse::Prefill(_) => {}
            InferStreamResponse::Intermediate { token, top_tokens } => {
                index += 1;
                let event = StreamResponse {
                    index,
                    token: token.into(),
                    top_tokens: top_tokens.into_iter().map(Token::from).collect(),
                    generated_text: None,
                    details: None,
                };
                if !tx.json(&event).await {
                    return Ok(());
                }
            }
            InferStreamResponse::End {
                token,
                top_tokens,
                generated_text,
                queued,
                start,
            } => {
                index += 1;
                let generated = generated_text.generated_tokens;
                Timings::new(arrived, validation_time, queued, start, generated)
                    .record_success(generated);
                let mut text = generated_text.text;
                if parameters.return_full_text == Some(true) {
                    text.insert_str(0, &request.inputs);
                }
                let details = parameters.details.then(|| StreamDetails {
                    finish_reason: FinishReason::from(generated_text.finish_reason),
                    generated_tokens: generated,
                    seed: admission.do_sample.then_some(admission.seed),
                    input_length,
                });
                let event = StreamResponse {
                    index,
                    token: token.into(),
                    top_tokens: top_tokens.into_iter().map(Token::from).collect(),
                    generated_text: Some(text),
                    details,
                };
                tx.json(&event).await;
                return Ok(());
            }
        }
    }
    Err(InferError::IncompleteGenerationStream.into())
}
