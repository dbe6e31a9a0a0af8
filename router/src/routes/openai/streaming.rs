//! OpenAI streams: the choices' events interleaved as they come, stop text held back, chunks in
//! OpenAI's shape, usage and `[DONE]` at the end.

use futures::stream::{self, StreamExt};

use super::tools::CallStream;
use super::{chat_logprob, push_completion_logprob, Kind, OpenAiReply};
use crate::error::ApiError;
use crate::routes::generation::Timings;
use crate::routes::sse::EventSender;
use crate::routes::stop::StopFilter;
use crate::types::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatLogprob, ChatLogprobs, Completion,
    CompletionChoice, CompletionLogprobs, FinishReason, ToolCallDelta, Usage,
};
use wick_scheduler::infer::EventStream;
use wick_scheduler::request::{InferError, InferStreamResponse};

/// Per-choice state of a stream.
pub(super) struct GenState {
    pub(super) filter: StopFilter,
    pub(super) input_length: u32,
    pub(super) arrived: std::time::Instant,
    pub(super) validation_time: std::time::Duration,
    pub(super) text_offset: usize,
    /// Text of the tokens so far, before stop filtering.
    pub(super) streamed: String,
    pub(super) done: bool,
    /// With tools: reads the text as content or calls.
    pub(super) calls: Option<CallStream>,
    /// `echo`: the prompt, sent ahead of the first piece.
    pub(super) echo: Option<String>,
}

/// Interleaves the choices' events as they come; ends with the usage chunk (when asked for)
/// and `[DONE]`. An error is sent in OpenAI's shape, then `[DONE]`.
pub(super) async fn stream_choices(
    job: OpenAiReply,
    mut gens: Vec<GenState>,
    streams: Vec<EventStream>,
    tx: EventSender,
) {
    let mut merged = stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |event| (i, event))),
    );
    let mut usage = Usage {
        prompt_tokens: gens
            .iter()
            .step_by(job.n.max(1))
            .map(|g| g.input_length)
            .sum(),
        completion_tokens: 0,
        total_tokens: 0,
    };
    while let Some((i, event)) = merged.next().await {
        let gen = &mut gens[i];
        let (token, top, end) = match event {
            Ok(InferStreamResponse::Prefill(_)) => continue,
            Ok(InferStreamResponse::Intermediate { token, top_tokens }) => {
                (token, top_tokens, None)
            }
            Ok(InferStreamResponse::End {
                token,
                top_tokens,
                generated_text,
                queued,
                start,
            }) => (token, top_tokens, Some((generated_text, queued, start))),
            Err(e) => {
                send_error(&tx, e.into()).await;
                return;
            }
        };
        // Special tokens (EOS) carry no content, as in the non-stream text.
        let mut piece = if token.special {
            String::new()
        } else {
            token.text.clone()
        };
        if let Some((generated, _, _)) = &end {
            // The final text is decoded from all tokens at once; where it differs from the
            // pieces streamed (bytes of a character left incomplete), it is the truth.
            if let Some(rest) = generated.text.strip_prefix(gen.streamed.as_str()) {
                piece = rest.to_string();
            }
        }
        gen.streamed.push_str(&piece);
        let mut text = gen.filter.push(&piece);
        if let Some(prompt) = gen.echo.take() {
            text.insert_str(0, &prompt);
        }
        let mut finish = end.map(|(generated, queued, start)| {
            text.push_str(&gen.filter.finish());
            gen.done = true;
            let n = generated.generated_tokens;
            Timings::new(gen.arrived, gen.validation_time, queued, start, n).record_success(n);
            usage.completion_tokens += n;
            FinishReason::from(generated.finish_reason)
                .openai()
                .to_string()
        });
        let mut tool_calls = None;
        if let Some(calls) = gen.calls.as_mut() {
            let delta = calls.push(&text);
            text = delta.content;
            if finish.is_some() {
                text.push_str(&calls.finish());
                if calls.made_calls() && finish.as_deref() == Some("stop") {
                    finish = Some("tool_calls".into());
                }
            }
            tool_calls = (!delta.tool_calls.is_empty()).then_some(delta.tool_calls);
            // Text held back while it may still become a call makes no chunk of its own.
            if text.is_empty() && tool_calls.is_none() && finish.is_none() && !job.logprobs {
                continue;
            }
        }
        let sent = match job.kind {
            Kind::Chat => {
                tx.json(&chat_chunk(
                    &job,
                    i,
                    text,
                    tool_calls,
                    job.logprobs.then(|| chat_logprob(&token, &top)),
                    finish,
                ))
                .await
            }
            Kind::Completion => {
                let logprobs = job.logprobs.then(|| {
                    let mut lp = CompletionLogprobs::default();
                    push_completion_logprob(&mut lp, &token, &top, &mut gen.text_offset);
                    lp
                });
                tx.json(&completion_chunk(&job, i, text, logprobs, finish))
                    .await
            }
        };
        if !sent {
            return;
        }
    }
    if gens.iter().any(|g| !g.done) {
        send_error(&tx, InferError::IncompleteGenerationStream.into()).await;
        return;
    }
    if job.include_usage {
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        let sent = match job.kind {
            Kind::Chat => {
                tx.json(&ChatCompletionChunk {
                    choices: vec![],
                    usage: Some(usage),
                    ..chat_chunk(&job, 0, String::new(), None, None, None)
                })
                .await
            }
            Kind::Completion => {
                tx.json(&Completion {
                    choices: vec![],
                    usage: Some(usage),
                    ..completion_chunk(&job, 0, String::new(), None, None)
                })
                .await
            }
        };
        if !sent {
            return;
        }
    }
    tx.data("[DONE]".into()).await;
}

pub(super) async fn send_error(tx: &EventSender, error: ApiError) {
    error.record();
    if tx.json(&error.openai_body()).await {
        tx.data("[DONE]".into()).await;
    }
}

pub(super) fn chat_chunk(
    job: &OpenAiReply,
    index: usize,
    content: String,
    tool_calls: Option<Vec<ToolCallDelta>>,
    logprob: Option<ChatLogprob>,
    finish_reason: Option<String>,
) -> ChatCompletionChunk {
    // A chunk of calls has no content (OpenAI sends none rather than an empty string).
    let content = (tool_calls.is_none() || !content.is_empty()).then_some(content);
    ChatCompletionChunk {
        id: job.id.clone(),
        object: "chat.completion.chunk".into(),
        created: job.created,
        model: job.model.clone(),
        system_fingerprint: job.fingerprint.clone(),
        choices: vec![ChatChunkChoice {
            index: index as u32,
            delta: ChatDelta {
                role: Some("assistant".into()),
                content,
                tool_calls,
            },
            logprobs: logprob.map(|l| ChatLogprobs { content: vec![l] }),
            finish_reason,
        }],
        usage: None,
    }
}

pub(super) fn completion_chunk(
    job: &OpenAiReply,
    index: usize,
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish_reason: Option<String>,
) -> Completion {
    Completion {
        id: job.id.clone(),
        object: "text_completion".into(),
        created: job.created,
        model: job.model.clone(),
        system_fingerprint: job.fingerprint.clone(),
        choices: vec![CompletionChoice {
            index: index as u32,
            text,
            logprobs,
            finish_reason,
        }],
        usage: None,
    }
}
