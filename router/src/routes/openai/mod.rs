//! OpenAI's routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`. OpenAI semantics
//! where TGI deviates: stop text is not returned, `finish_reason` is `stop|length`, ids are
//! unique, `n` generates several choices, `presence_penalty` is a presence penalty.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::generation::{
    acquire_more, admit, run_to_end, start, unique_id, unix_now, Completed, Permitted,
};
use super::native::timing_headers;
use super::sse;
use super::stop::StopFilter;
use super::AppState;
use crate::chat_template::TemplateMessage;
use crate::error::{ApiError, ApiJson, HttpError};
use crate::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprob, ChatLogprobs,
    ChatMessage, ChatRequest, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
    FinishReason, GenerateParameters, ModelCard, ModelList, OpenAiErrorResponse, StopSpec,
    TopLogprob, Usage,
};
use crate::validation::{random_seed, ValidationError};
use serde_json::Value;
use wick_scheduler::request::Token;

mod streaming;
mod tools;

use streaming::{stream_choices, GenState};
use tools::{parse_calls, CallStream, ToolCalling};

/// The served model.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "OpenAI",
    responses((status = 200, description = "Served model", body = ModelList))
)]
pub(crate) async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let id = state.model_id().to_string();
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: id.clone(),
            object: "model".into(),
            created: 0,
            owned_by: id,
        }],
    })
}

/// Chat completion (OpenAI compatible), streamed with `stream: true`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "OpenAI",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "Chat completion, or with `stream: true` server-sent events: chunks, then `[DONE]` (an error arrives as an error event)", content(
            (ChatCompletion = "application/json"),
            (ChatCompletionChunk = "text/event-stream"),
        )),
        (status = 400, description = "Body is not valid JSON or not of this shape", body = OpenAiErrorResponse),
        (status = 413, description = "Body larger than --payload-limit", body = OpenAiErrorResponse),
        (status = 415, description = "No `Content-Type: application/json`", body = OpenAiErrorResponse),
        (status = 422, description = "Input validation error", body = OpenAiErrorResponse),
        (status = 424, description = "Generation error", body = OpenAiErrorResponse),
        (status = 429, description = "Model is overloaded", body = OpenAiErrorResponse),
    )
)]
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, HttpError> {
    chat(state, request).await.map_err(HttpError::openai)
}

/// Text completion (OpenAI's legacy API): one or more prompts, `n` choices each.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "OpenAI",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "Completion, or with `stream: true` server-sent events: chunks, then `[DONE]` (an error arrives as an error event)", content(
            (Completion = "application/json"),
            (Completion = "text/event-stream"),
        )),
        (status = 400, description = "Body is not valid JSON or not of this shape", body = OpenAiErrorResponse),
        (status = 413, description = "Body larger than --payload-limit", body = OpenAiErrorResponse),
        (status = 415, description = "No `Content-Type: application/json`", body = OpenAiErrorResponse),
        (status = 422, description = "Input validation error", body = OpenAiErrorResponse),
        (status = 424, description = "Generation error", body = OpenAiErrorResponse),
        (status = 429, description = "Model is overloaded", body = OpenAiErrorResponse),
    )
)]
pub(crate) async fn completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, HttpError> {
    complete(state, request).await.map_err(HttpError::openai)
}

/// The TGI parameters of OpenAI's sampling and stop fields, with details on (choices need
/// the finish reason and token counts). Temperature 0 means greedy, any other value samples;
/// `top_p: 1` means "off", which TGI's range check would refuse.
fn openai_parameters(
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Option<&StopSpec>,
) -> GenerateParameters {
    let (do_sample, temperature) = match temperature {
        Some(0.0) => (false, None),
        other => (true, other),
    };
    GenerateParameters {
        temperature,
        do_sample,
        top_p: top_p.filter(|p| *p != 1.0),
        stop: stop.cloned().map(StopSpec::into_vec).unwrap_or_default(),
        details: true,
        ..Default::default()
    }
}

/// How many generations, and the id/model fields shared by their answers.
struct OpenAiReply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    /// Choices per prompt.
    n: usize,
    /// Tool calling is on: answers are read as calls or content.
    tools: bool,
    /// `/v1/completions` with `echo`: the prompts, each answer starts with its own.
    echo: Vec<String>,
    stops: Vec<String>,
    logprobs: bool,
    include_usage: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl OpenAiReply {
    fn new(
        state: &AppState,
        kind: Kind,
        n: usize,
        parameters: &GenerateParameters,
        logprobs: bool,
        include_usage: bool,
    ) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Self {
            kind,
            id: unique_id(prefix),
            created: unix_now(),
            model: state.model_id().to_string(),
            fingerprint: state.system_fingerprint.to_string(),
            n,
            tools: false,
            echo: Vec::new(),
            stops: parameters.stop.clone(),
            logprobs,
            include_usage,
        }
    }
}

async fn chat(state: AppState, request: ChatRequest) -> Result<Response, ApiError> {
    if request.messages.is_empty() {
        // OpenAI refuses an empty conversation too; rendering one would leave the model
        // only the template's generation prompt.
        return Err(ApiError::Body {
            status: axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            message: "`messages` must hold at least one message".into(),
        });
    }
    if let Some(user) = &request.user {
        tracing::debug!(user, "chat completion");
    }
    let tools = ToolCalling::from_request(
        request.tools.as_deref(),
        request.tool_choice.as_ref(),
        request.parallel_tool_calls,
    )?;
    let mut grammar = match &request.response_format {
        Some(format) => response_format_grammar(format)?,
        None => None,
    };
    if let Some(tools) = &tools {
        if grammar.is_some() {
            return Err(ApiError::Tool(
                "Grammar and tools are mutually exclusive".into(),
            ));
        }
        grammar = Some(tools.grammar());
    }
    let n = check_n(request.n, 1, state.max_client_batch_size)?;
    let template = state.template.as_ref().as_ref().map_err(|e| e.clone())?;
    let mut messages: Vec<TemplateMessage> = request
        .messages
        .iter()
        .map(|m| template_message(m, template.knows_tools()))
        .collect();
    let template_tools = tools.as_ref().map(ToolCalling::template_tools);
    if let Some(tools) = tools.as_ref().filter(|_| !template.knows_tools()) {
        // The template shows no tools itself: tell the model in the system message.
        let prompt = tools.system_prompt();
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => messages.insert(
                0,
                TemplateMessage {
                    role: "system".into(),
                    content: prompt,
                    ..Default::default()
                },
            ),
        }
    }
    let prompt = template.apply_with_tools(&messages, template_tools.as_deref())?;
    let logprobs = request.logprobs.unwrap_or(false);
    let parameters = GenerateParameters {
        frequency_penalty: request.frequency_penalty,
        presence_penalty: request.presence_penalty,
        ignore_eos: request.ignore_eos,
        max_new_tokens: request.max_completion_tokens.or(request.max_tokens),
        seed: request.seed,
        top_n_tokens: if logprobs { request.top_logprobs } else { None },
        grammar,
        min_new_tokens: request.min_tokens,
        logit_bias: request.logit_bias.clone(),
        ..openai_parameters(request.temperature, request.top_p, request.stop.as_ref())
    };
    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
    let mut job = OpenAiReply::new(&state, Kind::Chat, n, &parameters, logprobs, include_usage);
    job.tools = tools.is_some();
    // The template supplies BOS and friends.
    let admitted = admit_all(&state, &[prompt], n, &parameters, false, request.stream).await?;
    respond(state, job, admitted, request.stream).await
}

/// A request message as the template sees it. A template that knows no tools sees calls as
/// the text the model writes for them and tool results as a user turn.
fn template_message(m: &ChatMessage, knows_tools: bool) -> TemplateMessage {
    let mut content = m.content.as_ref().map(|c| c.to_text()).unwrap_or_default();
    let calls = m.tool_calls.as_deref().unwrap_or_default();
    let mut role = m.role.clone();
    if !knows_tools {
        for call in calls {
            let arguments: Value =
                serde_json::from_str(&call.function.arguments).unwrap_or(Value::Null);
            // The layout the grammar makes the model write.
            let name = Value::String(call.function.name.clone());
            content.push_str(&format!(
                "{}\n{{\"name\": {name}, \"arguments\": {arguments}}}\n{}",
                tools::OPEN,
                tools::CLOSE
            ));
        }
        if role == "tool" {
            role = "user".into();
            content = format!("<tool_response>\n{content}\n</tool_response>");
        }
    }
    TemplateMessage {
        role,
        content,
        name: m.name.clone(),
        tool_calls: (knows_tools && !calls.is_empty()).then(|| {
            calls
                .iter()
                .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
                .collect()
        }),
        tool_call_id: m.tool_call_id.clone(),
    }
}

/// OpenAI's `response_format` as TGI's `parameters.grammar`: `text` is none; `json_object`
/// is any JSON object; `json_schema` is its `schema` (any object when it has none; `strict`
/// changes nothing: the schema is always enforced). TGI's own forms (`{"type": "json" |
/// "regex", "value"}`) pass as they are.
fn response_format_grammar(format: &Value) -> Result<Option<Value>, ApiError> {
    let any_object = || serde_json::json!({"type": "json", "value": {"type": "object"}});
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") if format.get("value").is_none() => Ok(Some(any_object())),
        Some("json_schema") if format.get("value").is_none() => {
            let spec = format
                .get("json_schema")
                .filter(|spec| spec.is_object())
                .ok_or_else(|| {
                    ValidationError::InvalidGrammar("`json_schema` must be an object".into())
                })?;
            match spec.get("schema") {
                None => Ok(Some(any_object())),
                Some(schema @ Value::Object(_)) => {
                    Ok(Some(serde_json::json!({"type": "json", "value": schema})))
                }
                Some(_) => Err(ValidationError::InvalidGrammar(
                    "`json_schema.schema` must be an object".into(),
                )
                .into()),
            }
        }
        Some(_) if format.get("value").is_some() => Ok(Some(format.clone())),
        _ => Err(ValidationError::Grammar.into()),
    }
}

async fn complete(state: AppState, request: CompletionRequest) -> Result<Response, ApiError> {
    if let Some(user) = &request.user {
        tracing::debug!(user, "completion");
    }
    if request.suffix.is_some() {
        return Err(ApiError::SuffixNotSupported);
    }
    let prompts = request.prompt.clone().into_vec();
    if prompts.len() > state.max_client_batch_size {
        return Err(ApiError::BatchSizeExceeded(state.max_client_batch_size));
    }
    if prompts.is_empty() {
        return Err(ValidationError::EmptyInput.into());
    }
    let n = check_n(request.n, prompts.len(), state.max_client_batch_size)?;
    let logprobs = request.logprobs.is_some();
    if request.echo && logprobs && request.stream {
        return Err(ApiError::Body {
            status: axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            message: "`echo` with `logprobs` is not supported when streaming".into(),
        });
    }
    let parameters = GenerateParameters {
        repetition_penalty: request.repetition_penalty,
        frequency_penalty: request.frequency_penalty,
        presence_penalty: request.presence_penalty,
        ignore_eos: request.ignore_eos,
        max_new_tokens: request.max_tokens,
        seed: request.seed,
        top_n_tokens: request.logprobs,
        // The echoed prompt's own logprobs.
        decoder_input_details: request.echo && logprobs,
        min_new_tokens: request.min_tokens,
        logit_bias: request.logit_bias.clone(),
        ..openai_parameters(request.temperature, request.top_p, request.stop.as_ref())
    };
    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
    let mut job = OpenAiReply::new(
        &state,
        Kind::Completion,
        n,
        &parameters,
        logprobs,
        include_usage,
    );
    if request.echo {
        job.echo = prompts.clone();
    }
    let admitted = admit_all(&state, &prompts, n, &parameters, true, request.stream).await?;
    respond(state, job, admitted, request.stream).await
}

/// `n` must be at least 1, and prompts × n at most `max_client_batch_size`.
fn check_n(
    n: Option<usize>,
    prompts: usize,
    max_client_batch_size: usize,
) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    let max = (max_client_batch_size / prompts.max(1)).max(1);
    if n == 0 || n > max {
        return Err(ApiError::N(max, n));
    }
    Ok(n)
}

/// Admits `n` generations per prompt, in OpenAI's choice order (prompt-major). Each prompt is
/// validated once; its copies get their own permit and a distinct seed.
async fn admit_all(
    state: &AppState,
    prompts: &[String],
    n: usize,
    parameters: &GenerateParameters,
    add_special_tokens: bool,
    stream: bool,
) -> Result<Vec<Permitted>, ApiError> {
    let mut all = Vec::with_capacity(prompts.len() * n);
    for prompt in prompts {
        let first = admit(state, prompt, add_special_tokens, parameters, stream).await?;
        let permits = acquire_more(state, n - 1)?;
        let copies: Vec<Permitted> = permits
            .into_iter()
            .enumerate()
            .map(|(j, permit)| {
                let mut valid = first.valid.clone();
                let p = &mut valid.request.parameters;
                p.seed = match parameters.seed {
                    Some(seed) => seed.wrapping_add(j as u64 + 1),
                    None if p.do_sample => random_seed(),
                    None => p.seed,
                };
                Permitted {
                    permit,
                    valid,
                    arrived: first.arrived,
                    validation_time: first.validation_time,
                }
            })
            .collect();
        all.push(first);
        all.extend(copies);
    }
    Ok(all)
}

async fn respond(
    state: AppState,
    job: OpenAiReply,
    admitted: Vec<Permitted>,
    stream: bool,
) -> Result<Response, ApiError> {
    if stream {
        let mut streams = Vec::with_capacity(admitted.len());
        let mut gens = Vec::with_capacity(admitted.len());
        for a in admitted {
            gens.push(GenState {
                filter: StopFilter::new(job.stops.clone()),
                input_length: a.valid.input_length,
                arrived: a.arrived,
                validation_time: a.validation_time,
                text_offset: 0,
                streamed: String::new(),
                done: false,
                calls: job.tools.then(|| CallStream::new(call_id_prefix())),
                echo: Some(echoed(&job, gens.len()).to_string()).filter(|e| !e.is_empty()),
            });
            streams.push(start(&state, a)?);
        }
        let (tx, response) = sse::channel(state.compute_type.clone());
        // The stream outlives the handler: it carries the request's span on.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            stream_choices(job, gens, streams, tx).await;
        }));
        return Ok(response);
    }
    let finished =
        futures::future::try_join_all(admitted.into_iter().map(|a| run_to_end(&state, a))).await?;
    let mut headers = HeaderMap::new();
    headers.insert("x-compute-type", state.compute_type.clone());
    let usage = usage(&finished, job.n);
    if let Some(first) = finished.first() {
        timing_headers(
            &mut headers,
            &first.timings,
            0,
            usage.prompt_tokens,
            usage.completion_tokens,
        );
    }
    let body = match job.kind {
        Kind::Chat => {
            let choices = finished
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let calls = assistant_calls(&job, f);
                    // Calls cut short by the token limit keep `length`.
                    let finish = match (&calls, finish_reason(f)) {
                        (Some(_), "stop") => "tool_calls",
                        (_, reason) => reason,
                    };
                    ChatChoice {
                        index: i as u32,
                        message: assistant_message(f, calls),
                        logprobs: job.logprobs.then(|| ChatLogprobs {
                            content: f
                                .tokens
                                .iter()
                                .zip(&f.top_tokens)
                                .map(|(t, top)| chat_logprob(t, top))
                                .collect(),
                        }),
                        finish_reason: finish.into(),
                    }
                })
                .collect();
            chat_completion(job, choices, usage)
        }
        Kind::Completion => {
            let choices: Vec<CompletionChoice> = finished
                .iter()
                .enumerate()
                .map(|(i, f)| CompletionChoice {
                    index: i as u32,
                    text: format!("{}{}", echoed(&job, i), f.generated.text_before_stop()),
                    logprobs: job.logprobs.then(|| {
                        let mut lp = CompletionLogprobs::default();
                        let mut offset = 0;
                        if !job.echo.is_empty() {
                            push_prompt_logprobs(&mut lp, &f.prefill, &mut offset);
                        }
                        for (t, top) in f.tokens.iter().zip(&f.top_tokens) {
                            push_completion_logprob(&mut lp, t, top, &mut offset);
                        }
                        lp
                    }),
                    finish_reason: Some(finish_reason(f).into()),
                })
                .collect();
            Json(Completion {
                id: job.id,
                object: "text_completion".into(),
                created: job.created,
                model: job.model,
                system_fingerprint: job.fingerprint,
                choices,
                usage: Some(usage),
            })
            .into_response()
        }
    };
    Ok((headers, body).into_response())
}

/// The calls of a finished chat answer, when tools are on and the answer is calls.
fn assistant_calls(job: &OpenAiReply, f: &Completed) -> Option<Vec<crate::types::ToolCall>> {
    if !job.tools {
        return None;
    }
    parse_calls(&f.generated.text, &call_id_prefix())
}

fn chat_completion(job: OpenAiReply, choices: Vec<ChatChoice>, usage: Usage) -> Response {
    Json(ChatCompletion {
        id: job.id,
        object: "chat.completion".into(),
        created: job.created,
        model: job.model,
        system_fingerprint: job.fingerprint,
        choices,
        usage,
    })
    .into_response()
}

fn assistant_message(
    f: &Completed,
    calls: Option<Vec<crate::types::ToolCall>>,
) -> AssistantMessage {
    match calls {
        Some(calls) => AssistantMessage {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(calls),
        },
        None => AssistantMessage {
            role: "assistant".into(),
            content: Some(f.generated.text_before_stop().to_string()),
            tool_calls: None,
        },
    }
}

/// Ids of a response's calls: this prefix and the call's index.
fn call_id_prefix() -> String {
    format!("call_{:016x}_", random_seed())
}

fn finish_reason(f: &Completed) -> &'static str {
    FinishReason::from(f.generated.finish_reason).openai()
}

/// Prompt tokens count once per prompt (not per choice); completion tokens add up.
fn usage(finished: &[Completed], n: usize) -> Usage {
    let prompt_tokens = finished
        .iter()
        .step_by(n.max(1))
        .map(|f| f.input_length)
        .sum();
    let completion_tokens = finished.iter().map(|f| f.generated.generated_tokens).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

fn chat_logprob(token: &Token, top: &[Token]) -> ChatLogprob {
    ChatLogprob {
        token: token.text.clone(),
        logprob: token.logprob,
        top_logprobs: top
            .iter()
            .map(|t| TopLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
            })
            .collect(),
    }
}

/// The prompt choice `i` echoes (empty without `echo`).
fn echoed(job: &OpenAiReply, i: usize) -> &str {
    job.echo
        .get(i / job.n.max(1))
        .map(String::as_str)
        .unwrap_or_default()
}

/// An echoed prompt's tokens: their own logprobs (the first one has none), no alternatives.
fn push_prompt_logprobs(lp: &mut CompletionLogprobs, prompt: &[Token], offset: &mut usize) {
    for (i, t) in prompt.iter().enumerate() {
        let known = i > 0 && t.logprob.is_finite();
        lp.tokens.push(t.text.clone());
        lp.token_logprobs.push(known.then_some(t.logprob));
        lp.top_logprobs
            .push(known.then(|| [(t.text.clone(), t.logprob)].into_iter().collect()));
        lp.text_offset.push(*offset);
        *offset += t.text.len();
    }
}

fn push_completion_logprob(
    lp: &mut CompletionLogprobs,
    token: &Token,
    top: &[Token],
    offset: &mut usize,
) {
    lp.tokens.push(token.text.clone());
    lp.token_logprobs.push(Some(token.logprob));
    lp.top_logprobs.push(Some(
        top.iter().map(|t| (t.text.clone(), t.logprob)).collect(),
    ));
    lp.text_offset.push(*offset);
    *offset += token.text.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_greedy() {
        let sampling = |t| {
            let p = openai_parameters(t, None, None);
            (p.do_sample, p.temperature)
        };
        let top_p = |p| openai_parameters(None, p, None).top_p;
        assert_eq!(sampling(Some(0.0)), (false, None));
        assert_eq!(sampling(Some(0.7)), (true, Some(0.7)));
        assert_eq!(sampling(None), (true, None));
        assert_eq!(top_p(Some(1.0)), None);
        assert_eq!(top_p(Some(0.9)), Some(0.9));
    }

    #[test]
    fn tool_turns_render_for_templates_without_tools() {
        let call: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\": 1}"}}]
        }))
        .unwrap();
        let plain = template_message(&call, false);
        assert_eq!(
            plain.content,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\":1}}\n</tool_call>"
        );
        assert!(plain.tool_calls.is_none());
        let native = template_message(&call, true);
        assert_eq!(native.content, "");
        assert_eq!(native.tool_calls.unwrap()[0]["function"]["name"], "f");

        let result: ChatMessage = serde_json::from_value(serde_json::json!({
            "role": "tool", "tool_call_id": "c1", "content": "42"
        }))
        .unwrap();
        let plain = template_message(&result, false);
        assert_eq!(
            (plain.role.as_str(), plain.content.as_str()),
            ("user", "<tool_response>\n42\n</tool_response>")
        );
        let native = template_message(&result, true);
        assert_eq!(
            (native.role.as_str(), native.tool_call_id.as_deref()),
            ("tool", Some("c1"))
        );
    }

    #[test]
    fn n_is_bounded_by_the_client_batch_size() {
        assert_eq!(check_n(None, 2, 4).unwrap(), 1);
        assert_eq!(check_n(Some(2), 2, 4).unwrap(), 2);
        assert_eq!(
            check_n(Some(3), 2, 4).unwrap_err().to_string(),
            "`n` must be >= 1 and <= 2. Given: 3"
        );
        assert!(check_n(Some(0), 1, 4).is_err());
    }
}
