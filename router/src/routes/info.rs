//! Open routes: health, info, metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;
use crate::error::{ApiError, HttpError};
use crate::types::{ErrorResponse, Info};

/// 200 with an empty body when the shards answer; 503 otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "Text Generation Inference",
    responses(
        (status = 200, description = "Everything is working fine"),
        (status = 503, description = "Text generation inference is down", body = ErrorResponse,
            example = json!({"error": "unhealthy", "error_type": "healthcheck"})),
    )
)]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    health_of(&state).await
}

/// `GET /`: the health check (TGI answers `/` like `/health`).
#[utoipa::path(
    get,
    path = "/",
    tag = "Text Generation Inference",
    responses(
        (status = 200, description = "Everything is working fine"),
        (status = 503, description = "Text generation inference is down", body = ErrorResponse),
    )
)]
pub(crate) async fn root_health(State(state): State<AppState>) -> Response {
    health_of(&state).await
}

async fn health_of(state: &AppState) -> Response {
    if state.infer.health().await {
        StatusCode::OK.into_response()
    } else {
        HttpError::native(ApiError::Unhealthy).into_response()
    }
}

/// Model and limits.
#[utoipa::path(
    get,
    path = "/info",
    tag = "Text Generation Inference",
    responses((status = 200, description = "Served model info", body = Info))
)]
pub(crate) async fn info(State(state): State<AppState>) -> Json<Info> {
    Json(state.info.as_ref().clone())
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "Text Generation Inference",
    responses((status = 200, description = "Prometheus Metrics", body = String))
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    ::metrics::gauge!(wick_scheduler::metrics::REQUESTS_IN_FLIGHT)
        .set(state.infer.requests_in_flight() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}
