//! Server-sent events: handlers push `Event`s into a bounded channel from a task they spawn;
//! the response body drains it. When the client goes away the channel closes, the task's next
//! send fails, and dropping its generation streams cancels the requests in the scheduler. A
//! client that stays connected but stops reading is treated the same way once the buffer has
//! been full for [`STALLED_CLIENT_TIMEOUT`]: its request is cancelled and its permit freed,
//! instead of being held for as long as the connection lives.

use std::convert::Infallible;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio_stream::wrappers::ReceiverStream;

/// Events buffered between the generating task and a slow client.
const BUFFER: usize = 64;

/// How long the buffer may stay full (the client reads nothing, and the socket's own buffers
/// are full too) before the client counts as gone.
pub(crate) const STALLED_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The sending half handed to the generating task.
pub(crate) struct EventSender {
    tx: mpsc::Sender<Result<Event, Infallible>>,
    stall: Duration,
}

impl EventSender {
    /// Sends `data: <json>`; false when the client is gone (stop generating).
    pub async fn json(&self, value: &impl Serialize) -> bool {
        match serde_json::to_string(value) {
            Ok(text) => self.data(text).await,
            Err(e) => {
                tracing::error!("cannot serialize a stream event: {e}");
                false
            }
        }
    }

    /// Sends `data: <text>`; false when the client is gone or has read nothing for the stall
    /// timeout.
    pub async fn data(&self, text: String) -> bool {
        // A reading client leaves room: no timer per token. Only a full buffer waits, and
        // only that long.
        let event = match self.tx.try_send(Ok(Event::default().data(text))) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        match self.tx.send_timeout(event, self.stall).await {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(_)) => {
                tracing::info!("a client stopped reading its stream; its request is cancelled");
                false
            }
            Err(SendTimeoutError::Closed(_)) => false,
        }
    }
}

/// A channel and the SSE response reading it (with TGI's headers).
pub(crate) fn channel(compute_type: HeaderValue) -> (EventSender, Response) {
    channel_with_stall(compute_type, STALLED_CLIENT_TIMEOUT)
}

fn channel_with_stall(compute_type: HeaderValue, stall: Duration) -> (EventSender, Response) {
    let (tx, rx) = mpsc::channel(BUFFER);
    let mut response = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-compute-type", compute_type);
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    (EventSender { tx, stall }, response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_reads_nothing_is_dropped_after_the_stall_timeout() {
        let stall = Duration::from_millis(20);
        let (tx, response) = channel_with_stall(HeaderValue::from_static("cpu"), stall);
        // The buffer takes BUFFER events without a reader.
        for i in 0..BUFFER {
            assert!(tx.data(i.to_string()).await, "event {i}");
        }
        let start = std::time::Instant::now();
        assert!(!tx.data("one too many".into()).await);
        assert!(start.elapsed() >= stall);
        drop(response);
        // A reader that went away is seen at once.
        let (tx, response) = channel_with_stall(HeaderValue::from_static("cpu"), stall);
        drop(response);
        assert!(!tx.data("x".into()).await);
    }
}
