//! `--api-key`: generation routes require `Authorization: Bearer <key>`. The key is compared
//! in constant time and is never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{Api, ApiError};

/// The configured key. `Debug` is redacted so it cannot leak through logs.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        ApiKey(Arc::from(key))
    }

    /// Whether an `Authorization` header value carries this key as a bearer token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        // The scheme is case-insensitive (RFC 7235); the token is not.
        let Some(token) = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &value[7..])
        else {
            return false;
        };
        constant_time_eq(token, self.0.as_bytes())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Compares without an early exit, so the time taken does not reveal how many leading bytes
/// matched. (The length of the candidate is not secret.)
fn constant_time_eq(candidate: &[u8], key: &[u8]) -> bool {
    let mut diff = u8::from(candidate.len() != key.len());
    if key.is_empty() {
        return candidate.is_empty();
    }
    for (i, &c) in candidate.iter().enumerate() {
        diff |= c ^ key[i % key.len()];
    }
    std::hint::black_box(diff) == 0
}

/// Middleware for the generation routes.
pub async fn require_api_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if key.accepts(authorization) {
        next.run(request).await
    } else {
        let api = Api::from_path(request.uri().path());
        ApiError::Unauthorized.with_api(api).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_must_match_exactly() {
        let key = ApiKey::new("s3cret");
        assert!(key.accepts(Some(b"Bearer s3cret")));
        assert!(key.accepts(Some(b"bearer s3cret")));
        assert!(!key.accepts(Some(b"Bearer S3cret")));
        assert!(!key.accepts(Some(b"Bearer s3cre")));
        assert!(!key.accepts(Some(b"Bearer s3crets")));
        assert!(!key.accepts(Some(b"Basic s3cret")));
        assert!(!key.accepts(Some(b"s3cret")));
        assert!(!key.accepts(Some(b"Bearer ")));
        assert!(!key.accepts(None));
    }

    #[test]
    fn debug_never_shows_the_key() {
        assert!(!format!("{:?}", ApiKey::new("s3cret")).contains("s3cret"));
    }

    #[test]
    fn constant_time_eq_handles_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abcabc", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }
}
