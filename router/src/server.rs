//! The HTTP server: configuration, shared state, the Prometheus recorder, the axum app with its
//! layers (body limit, CORS, auth), and serving with graceful shutdown.

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method};
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::ApiKey;
use crate::chat_template::{ChatTemplate, TemplateError};
use crate::types::Info;
use crate::validation::{Validation, ValidationConfig};
use wick_scheduler::infer::Backend;
use wick_scheduler::metrics;
use wick_scheduler::startup::BackendInfo;

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Overrides the model name reported by `/info`, `/v1/models` and `model` fields.
    pub model_id: Option<String>,
    /// Requires `Authorization: Bearer <key>` on generation routes.
    pub api_key: Option<String>,
    /// Allowed CORS origins (`*` = any); empty = CORS closed.
    pub cors_allow_origin: Vec<String>,
    /// Every request is cancelled with a 504 (or an error event) once it has run this long
    /// from its arrival, queue included; `None` = no deadline.
    pub request_deadline: Option<std::time::Duration>,
    /// Largest accepted request body, in bytes.
    pub payload_limit: usize,
    /// Most prompts (× `n`) one `/v1/completions` request may carry.
    pub max_client_batch_size: usize,
    /// Reported by `/info` (the scheduler enforces it).
    pub max_concurrent_requests: usize,
}

/// Limits of request validation that come from flags (the token limits come from the shards).
#[derive(Debug, Clone)]
pub struct ValidationFlags {
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
    pub validation_workers: usize,
}

/// Everything `run` needs besides the scheduler.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub validation: ValidationFlags,
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder with TGI's buckets, once; later calls (several
/// servers in one test process) share the first one.
pub fn install_prometheus(
    max_input_tokens: u32,
    max_total_tokens: u32,
) -> anyhow::Result<PrometheusHandle> {
    // One installer at a time: a second caller waits and then finds the first one's handle.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let duration: Vec<f64> = (1..=35).map(|k| 0.0001 * 1.5f64.powi(k)).collect();
    let linear = |max: u32| -> Vec<f64> {
        let step = (f64::from(max) / 100.0).max(1.0);
        (1..=100).map(|i| step * f64::from(i)).collect()
    };
    let batch_sizes: Vec<f64> = (1..=1024).map(f64::from).collect();
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), &duration)?
        .set_buckets_for_metric(
            Matcher::Full(metrics::REQUEST_INPUT_LENGTH.into()),
            &linear(max_input_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full(metrics::REQUEST_GENERATED_TOKENS.into()),
            &linear(max_total_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full(metrics::REQUEST_MAX_NEW_TOKENS.into()),
            &linear(max_total_tokens),
        )?
        .set_buckets_for_metric(Matcher::Full(metrics::BATCH_NEXT_SIZE.into()), &batch_sizes)?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    match ::metrics::set_global_recorder(recorder) {
        Ok(()) => {
            metrics::describe();
            let _ = PROMETHEUS.set(handle.clone());
            Ok(handle)
        }
        Err(_) => PROMETHEUS
            .get()
            .cloned()
            .context("a metrics recorder that is not ours is already installed"),
    }
}

/// Builds the axum app (tests serve it on their own listener).
pub fn app(
    config: &Config,
    infer: Arc<dyn Backend>,
    backend: BackendInfo,
) -> anyhow::Result<Router> {
    let prometheus = install_prometheus(backend.max_input_tokens, backend.max_total_tokens)?;
    // Set at warmup, possibly before the recorder existed.
    ::metrics::gauge!(metrics::BATCH_MAX_TOTAL_TOKENS)
        .set(f64::from(backend.max_batch_total_tokens));
    let model_id = config
        .server
        .model_id
        .clone()
        .unwrap_or_else(|| backend.model_id.clone());
    let template = match &backend.chat_template {
        Some(source) => {
            ChatTemplate::new(source, backend.bos_token.clone(), backend.eos_token.clone())
        }
        None => Err(TemplateError::NotFound),
    };
    if let Err(e) = &template {
        tracing::warn!("chat template unavailable: {e}");
    }
    let flags = &config.validation;
    let tokenizer = tokenizers::Tokenizer::from_str(&backend.tokenizer_json)
        .map_err(|e| anyhow::anyhow!("the shard's tokenizer cannot be loaded: {e}"))?;
    let validation = Validation::new(
        ValidationConfig {
            max_best_of: flags.max_best_of,
            max_stop_sequences: flags.max_stop_sequences,
            max_top_n_tokens: flags.max_top_n_tokens,
            max_input_tokens: backend.max_input_tokens,
            max_total_tokens: backend.max_total_tokens,
            workers: flags.validation_workers,
        },
        tokenizer,
    )
    .context("cannot start the tokenizer workers")?;
    let version = env!("CARGO_PKG_VERSION");
    let info = Info {
        model_id,
        model_sha: None,
        model_pipeline_tag: None,
        max_concurrent_requests: config.server.max_concurrent_requests,
        max_best_of: flags.max_best_of,
        max_stop_sequences: flags.max_stop_sequences,
        max_input_tokens: backend.max_input_tokens,
        max_total_tokens: backend.max_total_tokens,
        validation_workers: flags.validation_workers,
        max_client_batch_size: config.server.max_client_batch_size,
        router: "wick-router".into(),
        version: version.into(),
        sha: None,
        docker_label: None,
        max_batch_total_tokens: backend.max_batch_total_tokens,
        block_size: backend.block_size,
        dtype: backend.dtype.clone(),
        device_type: backend.device_type.clone(),
        quantize: backend.quantize.clone(),
        world_size: backend.world_size,
        cpu_model: backend.cpu_model.clone(),
        cpu_features: backend.cpu_features.clone(),
        kernels: backend.kernels.clone(),
        kv_cache_dtype: backend.kv_cache_dtype.clone(),
        kv_cache_bytes_per_token: backend.kv_cache_bytes_per_token,
        grammar_types: ["json", "json_object", "json_schema", "regex", "lark"]
            .map(String::from)
            .to_vec(),
    };
    let compute_type = HeaderValue::from_str(&backend.device_type.to_ascii_lowercase())
        .unwrap_or_else(|_| HeaderValue::from_static("cpu"));
    let state = crate::routes::AppState {
        infer,
        validation,
        template: Arc::new(template),
        info: Arc::new(info),
        compute_type,
        prometheus,
        max_client_batch_size: config.server.max_client_batch_size,
        request_deadline: config.server.request_deadline,
        system_fingerprint: Arc::from(format!("{version}-native")),
    };
    let api_key = config.server.api_key.as_deref().map(ApiKey::new);
    let router = crate::routes::router(state, api_key)
        .layer(DefaultBodyLimit::max(config.server.payload_limit));
    Ok(match cors_layer(&config.server.cors_allow_origin)? {
        Some(cors) => router.layer(cors),
        None => router,
    })
}

/// CORS is closed unless origins are given (`*` opens it to any origin): unlike TGI, which
/// allows any origin by default, a browser page on another site cannot call wick unless the
/// operator says so.
fn cors_layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).with_context(|| format!("bad CORS origin {o:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                axum::http::header::CONTENT_TYPE,
                axum::http::header::AUTHORIZATION,
            ])
            .allow_origin(allow_origin),
    ))
}

/// Serves until `shutdown` resolves; in-flight requests finish first.
pub async fn run(
    config: Config,
    infer: Arc<dyn Backend>,
    backend: BackendInfo,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = app(&config, infer, backend)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("serving on http://{addr}");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")
}
