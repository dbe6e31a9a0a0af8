//! The route table. Generation routes sit behind the API key (when one is set); health, info,
//! metrics, the docs and the playground page stay open (the page asks for the key).

pub(crate) mod docs;
mod generation;
mod info;
mod native;
mod openai;
mod playground;
mod sse;
mod stop;

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa_swagger_ui::SwaggerUi;

pub use docs::ApiDoc;

use crate::auth::{require_api_key, ApiKey};
use crate::chat_template::{ChatTemplate, TemplateError};
use crate::types::Info;
use crate::validation::Validation;
use wick_scheduler::infer::Backend;

/// State shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub infer: Arc<dyn Backend>,
    pub validation: Validation,
    pub template: Arc<Result<ChatTemplate, TemplateError>>,
    pub info: Arc<Info>,
    /// `x-compute-type` header value.
    pub compute_type: HeaderValue,
    pub prometheus: PrometheusHandle,
    pub max_client_batch_size: usize,
    /// See [`crate::server::ServerConfig::request_deadline`].
    pub request_deadline: Option<std::time::Duration>,
    /// `{version}-native`, OpenAI's `system_fingerprint`.
    pub system_fingerprint: Arc<str>,
}

impl AppState {
    pub fn model_id(&self) -> &str {
        &self.info.model_id
    }
}

/// All routes, with their state applied.
pub fn router(state: AppState, api_key: Option<ApiKey>) -> Router {
    let mut generation = Router::new()
        .route("/", post(native::compat_generate))
        .route("/generate", post(native::generate))
        .route("/generate_stream", post(native::generate_stream))
        .route("/tokenize", post(native::tokenize))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions));
    let keyed = api_key.is_some();
    if let Some(key) = api_key {
        generation = generation.layer(middleware::from_fn_with_state(key, require_api_key));
    }
    // Outermost: a refused key is traced and logged too.
    generation = generation.layer(middleware::from_fn(crate::telemetry::trace_request));
    let open = Router::new()
        .route("/", get(info::root_health))
        .route("/health", get(info::health))
        .route("/ping", get(info::health))
        .route("/info", get(info::info))
        .route("/metrics", get(info::metrics))
        .route("/playground", get(playground::playground))
        .route("/v1/models", get(openai::models));
    let limits = docs::Limits {
        validation: state.validation.config().clone(),
        max_client_batch_size: state.max_client_batch_size,
        api_key: keyed,
    };
    let docs = SwaggerUi::new("/docs")
        .external_url_unchecked("/api-doc/openapi.json", docs::document(&limits));
    generation.merge(open).with_state(state).merge(docs)
}
