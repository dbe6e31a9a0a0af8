//! Server-sent events framing: bytes as they arrive from the socket in, whole events out.
//!
//! Network reads split the stream anywhere — inside a line, between the CR and LF of a CRLF,
//! inside a multi-byte UTF-8 character — so the decoder keeps the unfinished line between
//! pushes. Line breaks are ASCII bytes that never occur inside a UTF-8 sequence, so complete
//! lines are always whole characters.

/// One dispatched event: its `event:` name if any, and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Incremental decoder of a `text/event-stream` body.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// The previous push ended with CR: an LF opening the next push belongs to that CRLF.
    skip_lf: bool,
    data: String,
    has_data: bool,
    event: Option<String>,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the body; returns the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if std::mem::take(&mut self.skip_lf) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' | b'\r' => {
                    self.skip_lf = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&line) {
                        events.push(event);
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// The body ended. The specification drops an event without its closing blank line; some
    /// servers close the connection right after their last `data:` line, so it is kept.
    pub fn finish(mut self) -> Option<SseEvent> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.line_done(&line) {
                return Some(event);
            }
        }
        self.line_done(b"")
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None; // a comment, often a keep-alive
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            _ => {} // id, retry and unknown fields do not matter to a benchmark
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    fn decode_whole(body: &[u8]) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::new();
        let mut events = decoder.push(body);
        events.extend(decoder.finish());
        events
    }

    const BODY: &str = ": keep-alive\r\n\
        data: {\"a\":\"é😀\"}\r\n\r\n\
        event: error\n\
        data: line one\n\
        data: line two\n\n\
        data:no-space\r\r\
        id: 7\n\
        retry: 10\n\
        data\n\n\
        data: [DONE]\n\n";

    fn expected() -> Vec<SseEvent> {
        let plain = |d: &str| SseEvent {
            event: None,
            data: d.to_string(),
        };
        vec![
            plain("{\"a\":\"é😀\"}"),
            SseEvent {
                event: Some("error".into()),
                data: "line one\nline two".into(),
            },
            plain("no-space"),
            plain(""),
            plain("[DONE]"),
        ]
    }

    #[test]
    fn whole_body() {
        assert_eq!(decode_whole(BODY.as_bytes()), expected());
    }

    #[test]
    fn split_at_every_byte_position() {
        let body = BODY.as_bytes();
        for cut in 0..=body.len() {
            let mut decoder = SseDecoder::new();
            let mut events = decoder.push(&body[..cut]);
            events.extend(decoder.push(&body[cut..]));
            events.extend(decoder.finish());
            assert_eq!(events, expected(), "split at byte {cut}");
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for b in BODY.as_bytes() {
            events.extend(decoder.push(std::slice::from_ref(b)));
        }
        events.extend(decoder.finish());
        assert_eq!(events, expected());
    }

    #[test]
    fn crlf_split_between_cr_and_lf_is_one_line_break() {
        let mut decoder = SseDecoder::new();
        assert!(decoder.push(b"data: x\r").is_empty());
        // The LF completes the CRLF; the next CRLF is the blank line that dispatches.
        assert_eq!(data(&decoder.push(b"\n\r\n")), ["x"]);
    }

    #[test]
    fn comments_and_blank_lines_alone_dispatch_nothing() {
        assert!(decode_whole(b": ping\n\n\n: pong\r\n\r\n").is_empty());
    }

    #[test]
    fn last_event_without_blank_line_is_kept() {
        assert_eq!(
            data(&decode_whole(b"data: a\n\ndata: [DONE]")),
            ["a", "[DONE]"]
        );
        assert_eq!(
            data(&decode_whole(b"data: a\n\ndata: [DONE]\n")),
            ["a", "[DONE]"]
        );
    }

    #[test]
    fn event_name_does_not_leak_into_the_next_event() {
        let events = decode_whole(b"event: error\ndata: a\n\ndata: b\n\n");
        assert_eq!(events[0].event.as_deref(), Some("error"));
        assert_eq!(events[1].event, None);
    }
}
