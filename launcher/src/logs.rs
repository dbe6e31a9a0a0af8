//! The launcher's own logging, and the re-emission of its children's log lines: children log
//! tracing JSON lines, which are re-emitted here at their own level, prefixed with the child's
//! name, so one stream (text or JSON) carries the whole deployment.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tracing::Level;
use tracing_subscriber::EnvFilter;

/// Lines of a child's output kept to explain its death.
pub const TAIL_LINES: usize = 50;

/// Installs the launcher's subscriber: `LOG_LEVEL` (default `info`) as an `EnvFilter`, text or
/// JSON lines on stdout.
pub fn init(json_output: bool) {
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json_output {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).init();
    }
}

/// The last [`TAIL_LINES`] lines a child wrote (both streams, in order of arrival).
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        // A poisoned lock only means another forwarder panicked mid-push; the lines are
        // still usable.
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect()
    }
}

/// Which of a child's streams a line came from: plain (non-JSON) lines on stderr are usually
/// panics or errors, so they are re-emitted one level higher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A child's log line, parsed.
#[derive(Debug, PartialEq)]
pub struct Line {
    pub level: Level,
    /// The message followed by the event's other fields as `key=value`.
    pub text: String,
}

/// Parses one output line: a tracing JSON event (`flatten_event` or not) keeps its level and
/// fields; anything else is plain text at INFO (stdout) or WARN (stderr).
pub fn parse_line(raw: &str, stream: Stream) -> Line {
    let plain = || Line {
        level: match stream {
            Stream::Stdout => Level::INFO,
            Stream::Stderr => Level::WARN,
        },
        text: raw.to_string(),
    };
    let Ok(Json::Object(event)) = serde_json::from_str::<Json>(raw) else {
        return plain();
    };
    let Some(level) = event.get("level").and_then(Json::as_str).and_then(level_of) else {
        return plain();
    };
    // Non-flattened events keep their fields under "fields".
    let fields = match event.get("fields") {
        Some(Json::Object(fields)) => fields,
        _ => &event,
    };
    let mut text = fields
        .get("message")
        .map(json_text)
        .unwrap_or_default()
        .to_string();
    // Sorted by key: the same text whether or not serde_json keeps insertion order (a feature
    // another crate of the workspace may switch on).
    let mut sorted: Vec<_> = fields.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (key, value) in sorted {
        if matches!(
            key.as_str(),
            "message" | "level" | "timestamp" | "target" | "fields" | "span" | "spans"
        ) {
            continue;
        }
        text.push_str(&format!(" {key}={}", json_text(value)));
    }
    // A line logged inside a traced request names its trace.
    if let Some(trace_id) = event.get("span").and_then(|s| s.get("trace_id")) {
        text.push_str(&format!(" trace_id={}", json_text(trace_id)));
    }
    Line { level, text }
}

fn level_of(name: &str) -> Option<Level> {
    match name.to_ascii_uppercase().as_str() {
        "TRACE" => Some(Level::TRACE),
        "DEBUG" => Some(Level::DEBUG),
        "INFO" => Some(Level::INFO),
        "WARN" | "WARNING" => Some(Level::WARN),
        "ERROR" | "CRITICAL" => Some(Level::ERROR),
        _ => None,
    }
}

fn json_text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Re-emits one child line through the launcher's subscriber.
fn emit(child: &str, line: &Line) {
    macro_rules! at {
        ($level:expr) => {
            tracing::event!($level, "{child}: {}", line.text)
        };
    }
    match line.level {
        Level::TRACE => at!(Level::TRACE),
        Level::DEBUG => at!(Level::DEBUG),
        Level::INFO => at!(Level::INFO),
        Level::WARN => at!(Level::WARN),
        Level::ERROR => at!(Level::ERROR),
    }
}

/// Reads `reader` line by line until EOF, re-emitting each line and keeping it in `tail`.
pub async fn forward(child: String, reader: impl AsyncRead + Unpin, stream: Stream, tail: Tail) {
    let mut lines = BufReader::new(reader).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(raw)) => {
                if raw.trim().is_empty() {
                    continue;
                }
                let line = parse_line(&raw, stream);
                emit(&child, &line);
                tail.push(format!("{} {}", line.level, line.text));
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("cannot read the output of {child}: {e}");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_json_keeps_level_and_fields() {
        let line = parse_line(
            r#"{"timestamp":"t","level":"WARN","message":"slow","target":"x","rank":0,"model":"m"}"#,
            Stream::Stdout,
        );
        assert_eq!(line.level, Level::WARN);
        // Fields in key order.
        assert_eq!(line.text, "slow model=m rank=0");
    }

    #[test]
    fn a_line_inside_a_traced_request_keeps_its_trace_id() {
        let line = parse_line(
            r#"{"level":"INFO","message":"POST /generate","status":200,"span":{"name":"request","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"},"spans":[]}"#,
            Stream::Stdout,
        );
        assert_eq!(
            line.text,
            "POST /generate status=200 trace_id=4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn nested_json_fields_are_read() {
        let line = parse_line(
            r#"{"timestamp":"t","level":"ERROR","fields":{"message":"boom"},"target":"x"}"#,
            Stream::Stdout,
        );
        assert_eq!(
            line,
            Line {
                level: Level::ERROR,
                text: "boom".to_string()
            }
        );
    }

    #[test]
    fn plain_lines_depend_on_the_stream() {
        assert_eq!(parse_line("hello", Stream::Stdout).level, Level::INFO);
        let panic = parse_line("thread 'main' panicked", Stream::Stderr);
        assert_eq!(panic.level, Level::WARN);
        assert_eq!(panic.text, "thread 'main' panicked");
        // JSON without a tracing level is not a log event.
        assert_eq!(parse_line(r#"{"a":1}"#, Stream::Stdout).text, r#"{"a":1}"#);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let tail = Tail::default();
        for i in 0..TAIL_LINES + 5 {
            tail.push(i.to_string());
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "5");
        assert_eq!(lines.last().unwrap(), &(TAIL_LINES + 4).to_string());
    }

    #[tokio::test]
    async fn forward_reads_every_line_into_the_tail() {
        let tail = Tail::default();
        let input: &[u8] = b"one\n\n{\"level\":\"DEBUG\",\"message\":\"two\"}\n";
        forward("shard-0".into(), input, Stream::Stderr, tail.clone()).await;
        assert_eq!(tail.lines(), ["WARN one", "DEBUG two"]);
    }
}
