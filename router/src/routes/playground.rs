//! `/playground`: a page to chat with the model from a browser (streaming, the sampling
//! settings, the model's info, the request as curl). Self-contained and embedded in the binary:
//! it loads nothing from elsewhere, which its Content-Security-Policy also enforces.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("playground.html");

pub(crate) async fn playground() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
