//! One stress request: the six ways to ask for a generation (TGI's native routes and OpenAI's,
//! streamed and not), sent and read the way a client would, its outcome classified.

use std::time::Duration;

use serde_json::{json, Value};

use crate::openai::{error_message, interpret, StreamItem};
use crate::sse::{SseDecoder, SseEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Generate,
    GenerateStream,
    Completions,
    CompletionsStream,
    Chat,
    ChatStream,
}

impl Route {
    pub const ALL: [Route; 6] = [
        Route::Generate,
        Route::GenerateStream,
        Route::Completions,
        Route::CompletionsStream,
        Route::Chat,
        Route::ChatStream,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Route::Generate => "/generate",
            Route::GenerateStream => "/generate_stream",
            Route::Completions | Route::CompletionsStream => "/v1/completions",
            Route::Chat | Route::ChatStream => "/v1/chat/completions",
        }
    }

    pub fn streamed(self) -> bool {
        matches!(
            self,
            Route::GenerateStream | Route::CompletionsStream | Route::ChatStream
        )
    }

    pub fn native(self) -> bool {
        matches!(self, Route::Generate | Route::GenerateStream)
    }
}

/// Prompts of the deterministic requests: short, distinct, cheap to run alone first.
pub const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Translate to German: good morning",
    "Why is the sky blue?",
    "1, 2, 3, 4,",
];

/// A deterministic request: greedy, or sampled with a fixed seed, so its text alone and in
/// any batch must be the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Job {
    pub route: Route,
    pub prompt: usize,
    pub sampled: bool,
}

impl Job {
    /// The request's body: its prompt is `PROMPTS[self.prompt]`.
    pub fn body(&self, max_tokens: u32) -> Value {
        let prompt = PROMPTS[self.prompt];
        let seed = 1000 + self.prompt as u64;
        if self.route.native() {
            let mut parameters = json!({"max_new_tokens": max_tokens});
            if self.sampled {
                parameters["do_sample"] = json!(true);
                parameters["temperature"] = json!(0.8);
                parameters["top_p"] = json!(0.95);
                parameters["seed"] = json!(seed);
            }
            return json!({"inputs": prompt, "parameters": parameters});
        }
        let mut body = json!({
            "model": "wick",
            "max_tokens": max_tokens,
            "stream": self.route.streamed(),
            "temperature": if self.sampled { 0.8 } else { 0.0 },
        });
        if self.sampled {
            body["top_p"] = json!(0.95);
            body["seed"] = json!(seed);
        }
        match self.route {
            Route::Chat | Route::ChatStream => {
                body["messages"] = json!([{"role": "user", "content": prompt}]);
            }
            _ => body["prompt"] = json!(prompt),
        }
        body
    }
}

impl Job {
    /// Sends this job on its route (see [`send`]).
    pub async fn run(
        &self,
        client: &reqwest::Client,
        base: &str,
        max_tokens: u32,
        hang_up_after: Option<usize>,
        timeout: Duration,
    ) -> Outcome {
        let body = Payload::Json(self.body(max_tokens));
        send(
            client,
            base,
            self.route,
            self.route.path(),
            body,
            hang_up_after,
            timeout,
        )
        .await
    }
}

/// How one request ended, seen from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer, well formed to its end, with this generated text.
    Completed(String),
    /// The client hung up after this text (on purpose).
    Disconnected(String),
    /// A 4xx answer.
    Refused(u16, String),
    /// A 5xx answer.
    ServerError(u16, String),
    /// A broken answer: transport error, unparsable or out-of-order events, an error in the
    /// stream, a stream that ended without its last event.
    Broken(String),
    /// No end within the request timeout.
    TimedOut,
}

/// What the client sends: a JSON body, or raw bytes with a content type.
pub enum Payload {
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

/// Sends `payload` to `path`; for a streamed route, with `hang_up_after` the client drops the
/// connection after that many events.
pub async fn send(
    client: &reqwest::Client,
    base: &str,
    route: Route,
    path: &str,
    payload: Payload,
    hang_up_after: Option<usize>,
    timeout: Duration,
) -> Outcome {
    match tokio::time::timeout(
        timeout,
        exchange(client, base, route, path, payload, hang_up_after),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Outcome::TimedOut,
    }
}

async fn exchange(
    client: &reqwest::Client,
    base: &str,
    route: Route,
    path: &str,
    payload: Payload,
    hang_up_after: Option<usize>,
) -> Outcome {
    let request = client.post(format!("{base}{path}"));
    let request = match payload {
        Payload::Json(body) => request.json(&body),
        Payload::Raw(content_type, bytes) => request
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes),
    };
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Broken(format!("transport: {e}")),
    };
    let status = response.status().as_u16();
    let event_stream = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if status >= 400 || !event_stream {
        let body = match response.bytes().await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => return Outcome::Broken(format!("body: {e}")),
        };
        return match status {
            500.. => Outcome::ServerError(status, body),
            400..=499 => Outcome::Refused(status, body),
            _ if route.streamed() => Outcome::Broken(format!("{status} without a stream: {body}")),
            _ => whole(route, &body),
        };
    }
    let mut decoder = SseDecoder::new();
    let mut reader = StreamReader::new(route);
    loop {
        let chunk = match response.chunk().await {
            Ok(c) => c,
            Err(e) => return Outcome::Broken(format!("stream: {e}")),
        };
        let events = match &chunk {
            Some(bytes) => decoder.push(bytes),
            None => std::mem::take(&mut decoder).finish().into_iter().collect(),
        };
        for event in events {
            if let Err(e) = reader.event(&event) {
                return Outcome::Broken(e);
            }
            if hang_up_after.is_some_and(|n| reader.events >= n) {
                return Outcome::Disconnected(reader.text);
            }
        }
        if chunk.is_none() {
            return if reader.ended {
                Outcome::Completed(reader.text)
            } else {
                Outcome::Broken(format!(
                    "the stream closed without its last event after {} events",
                    reader.events
                ))
            };
        }
    }
}

/// The generated text of a non-streamed answer.
fn whole(route: Route, body: &str) -> Outcome {
    let value: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return Outcome::Broken(format!("unparsable answer ({e})")),
    };
    let text = match route {
        Route::Generate => value["generated_text"].as_str(),
        Route::Completions => value["choices"][0]["text"].as_str(),
        _ => value["choices"][0]["message"]["content"].as_str(),
    };
    match text {
        Some(t) => Outcome::Completed(t.to_string()),
        None => Outcome::Broken(format!("no generated text in {body}")),
    }
}

/// Reads a stream's events in order: the text so far, and whether its last event came.
struct StreamReader {
    route: Route,
    text: String,
    events: usize,
    ended: bool,
}

impl StreamReader {
    fn new(route: Route) -> Self {
        Self {
            route,
            text: String::new(),
            events: 0,
            ended: false,
        }
    }

    fn event(&mut self, event: &SseEvent) -> Result<(), String> {
        if self.ended {
            return Err(format!("an event after the last one: {}", event.data));
        }
        self.events += 1;
        if self.route.native() {
            let value: Value = serde_json::from_str(&event.data)
                .map_err(|e| format!("unparsable event ({e}): {}", event.data))?;
            if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
                return Err(format!("error event: {}", error_message(error)));
            }
            let token = &value["token"];
            if !token["special"].as_bool().unwrap_or(false) {
                self.text.push_str(
                    token["text"]
                        .as_str()
                        .ok_or_else(|| format!("an event without token text: {}", event.data))?,
                );
            }
            self.ended = !value["generated_text"].is_null();
            return Ok(());
        }
        match interpret(event.event.as_deref(), &event.data) {
            StreamItem::Done => self.ended = true,
            StreamItem::Error(e) => return Err(format!("error event: {e}")),
            StreamItem::Chunk(_) => {
                let value: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                let choice = &value["choices"][0];
                let piece = match self.route {
                    Route::CompletionsStream => choice["text"].as_str(),
                    _ => choice["delta"]["content"].as_str(),
                };
                self.text.push_str(piece.unwrap_or(""));
            }
        }
        Ok(())
    }
}
