//! The OpenAI-compatible wire format, as far as a load generator needs it: the streaming request
//! body, and what one `data:` payload of the response says.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Which OpenAI route to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions`, the prompt sent as is.
    Completions,
    /// `/v1/chat/completions`, the prompt sent as one user message.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// What every request of a run shares.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    pub endpoint: Endpoint,
    pub model: String,
    pub max_tokens: u32,
    pub ignore_eos: bool,
    pub temperature: Option<f32>,
}

impl RequestTemplate {
    /// A streaming request body that asks for the usage chunk at the end.
    pub fn body(&self, prompt: &str) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match self.endpoint {
            Endpoint::Completions => body["prompt"] = json!(prompt),
            Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": prompt}]),
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        body
    }
}

/// Token counts as the server reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
}

/// What one `data:` payload of the stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// `[DONE]`: the server finished the stream.
    Done,
    Chunk(Chunk),
    /// An error object inside the stream, or an event named `error`.
    Error(String),
}

/// A completion chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// The chunk carries generated text (or reasoning text). The role-only first chunk of a
    /// chat stream and the usage chunk do not.
    pub has_text: bool,
    /// A choice has a `finish_reason`.
    pub finished: bool,
    /// From the OpenAI `usage` object.
    pub usage: Option<TokenCounts>,
    /// From llama.cpp's `timings` object (`prompt_n` counts only the prompt tokens that were
    /// not served from its cache, so it is used only when `usage` is absent).
    pub timings: Option<TokenCounts>,
}

/// Interprets one `data:` payload; `event` is the SSE event name, if any.
pub fn interpret(event: Option<&str>, data: &str) -> StreamItem {
    let data = data.trim();
    if data == "[DONE]" {
        return StreamItem::Done;
    }
    let value: Value = match serde_json::from_str(data) {
        Ok(value) => value,
        Err(e) => return StreamItem::Error(format!("unparsable chunk ({e}): {}", clip(data))),
    };
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        return StreamItem::Error(error_message(error));
    }
    if event == Some("error") {
        return StreamItem::Error(clip(data));
    }
    let mut chunk = Chunk::default();
    for choice in value["choices"].as_array().into_iter().flatten() {
        let delta = &choice["delta"];
        let texts = [
            &choice["text"],
            &delta["content"],
            &delta["reasoning_content"],
            &delta["reasoning"],
        ];
        chunk.has_text |= texts
            .iter()
            .any(|t| t.as_str().is_some_and(|s| !s.is_empty()));
        chunk.finished |= !choice["finish_reason"].is_null();
    }
    let usage = &value["usage"];
    if usage.is_object() {
        chunk.usage = Some(TokenCounts {
            prompt: usage["prompt_tokens"].as_u64(),
            completion: usage["completion_tokens"].as_u64(),
        });
    }
    let timings = &value["timings"];
    if timings.is_object() {
        chunk.timings = Some(TokenCounts {
            prompt: timings["prompt_n"].as_u64(),
            completion: timings["predicted_n"].as_u64(),
        });
    }
    StreamItem::Chunk(chunk)
}

/// The message of an error object in any of the shapes servers use: `{"message": ...}`,
/// a bare string, or anything else (printed as JSON).
pub fn error_message(error: &Value) -> String {
    let text = match error {
        Value::String(s) => s.clone(),
        other => match other.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => other.to_string(),
        },
    };
    clip(&text)
}

/// Error texts are grouped and counted in the report: keep them short.
pub fn clip(text: &str) -> String {
    const MAX: usize = 160;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &str) -> Chunk {
        match interpret(None, data) {
            StreamItem::Chunk(c) => c,
            other => panic!("not a chunk: {other:?}"),
        }
    }

    #[test]
    fn completions_and_chat_text() {
        let c = chunk(r#"{"choices":[{"index":0,"text":" the","finish_reason":null}]}"#);
        assert!(c.has_text && !c.finished && c.usage.is_none());
        let c = chunk(r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#);
        assert!(c.has_text);
        let c = chunk(r#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#);
        assert!(c.has_text);
    }

    #[test]
    fn role_only_and_final_chunks_carry_no_text() {
        let c = chunk(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#);
        assert!(!c.has_text);
        let c = chunk(r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#);
        assert!(!c.has_text && c.finished);
    }

    #[test]
    fn usage_chunk_with_empty_choices() {
        let c = chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#,
        );
        assert!(!c.has_text);
        let usage = TokenCounts {
            prompt: Some(12),
            completion: Some(34),
        };
        assert_eq!(c.usage, Some(usage));
        // `"usage": null` on ordinary chunks (vLLM) is no usage.
        assert_eq!(chunk(r#"{"choices":[],"usage":null}"#).usage, None);
    }

    #[test]
    fn llama_cpp_timings() {
        let c = chunk(r#"{"choices":[],"timings":{"prompt_n":5,"predicted_n":9}}"#);
        let timings = TokenCounts {
            prompt: Some(5),
            completion: Some(9),
        };
        assert_eq!(c.timings, Some(timings));
    }

    #[test]
    fn done_and_errors() {
        assert_eq!(interpret(None, " [DONE] "), StreamItem::Done);
        let e = |s| interpret(None, s);
        assert_eq!(
            e(r#"{"error":{"message":"out of memory","type":"server_error"}}"#),
            StreamItem::Error("out of memory".into())
        );
        assert_eq!(
            e(r#"{"error":"Input validation error","error_type":"validation"}"#),
            StreamItem::Error("Input validation error".into())
        );
        assert!(matches!(e("{not json"), StreamItem::Error(_)));
        assert!(matches!(
            interpret(Some("error"), r#"{"detail":"x"}"#),
            StreamItem::Error(_)
        ));
        // A null error field is no error.
        assert!(matches!(
            e(r#"{"error":null,"choices":[]}"#),
            StreamItem::Chunk(_)
        ));
    }

    #[test]
    fn request_bodies() {
        let mut template = RequestTemplate {
            endpoint: Endpoint::Completions,
            model: "m".into(),
            max_tokens: 7,
            ignore_eos: true,
            temperature: None,
        };
        let body = template.body("hello");
        assert_eq!(body["prompt"], "hello");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["max_tokens"], 7);
        assert!(body.get("temperature").is_none());
        template.endpoint = Endpoint::Chat;
        template.ignore_eos = false;
        let body = template.body("hello");
        assert_eq!(body["messages"][0]["content"], "hello");
        assert!(body.get("prompt").is_none() && body.get("ignore_eos").is_none());
    }

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text_on_a_char_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(500);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), 161);
        assert!(clipped.ends_with('…'));
    }
}
