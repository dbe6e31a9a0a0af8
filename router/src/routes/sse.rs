//! Server-sent events: handlers push `Event`s into a bounded channel from a task they spawn;
//! the response body drains it. When the client goes away the channel closes, the task's next
//! send fails, and dropping its generation streams cancels the requests in the scheduler.

use std::convert::Infallible;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Events buffered between the generating task and a slow client.
const BUFFER: usize = 64;

/// The sending half handed to the generating task.
pub(crate) struct EventSender(mpsc::Sender<Result<Event, Infallible>>);

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

    /// Sends `data: <text>`; false when the client is gone.
    pub async fn data(&self, text: String) -> bool {
        self.0.send(Ok(Event::default().data(text))).await.is_ok()
    }
}

/// A channel and the SSE response reading it (with TGI's headers).
pub(crate) fn channel(compute_type: HeaderValue) -> (EventSender, Response) {
    let (tx, rx) = mpsc::channel(BUFFER);
    let mut response = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-compute-type", compute_type);
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    (EventSender(tx), response)
}
