//! Logs and traces. Every generation request runs in a `request` span (its parent the caller's
//! W3C `traceparent`, when it sends one) with children for its phases: `validation` here,
//! `queue`, `prefill` and `decode` in the scheduler. With `--otlp-endpoint` the spans are
//! exported over OTLP/gRPC (as TGI's `--otlp-endpoint`); with or without it, log lines inside a
//! request carry its `trace_id`.

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where traces go.
#[derive(Debug, Clone)]
pub struct Otlp {
    /// An OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// The `service.name` of the exported spans.
    pub service_name: String,
}

/// Installs the subscriber: `LOG_LEVEL` (default `info`), text or JSON lines, and the OTLP
/// exporter when `otlp` is given (call inside the tokio runtime: the gRPC channel lives on
/// it). The returned provider flushes the last spans on [`SdkTracerProvider::shutdown`].
pub fn init(json: bool, otlp: Option<&Otlp>) -> anyhow::Result<Option<SdkTracerProvider>> {
    let filter = EnvFilter::try_from_env("LOG_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let provider = match otlp {
        Some(otlp) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&otlp.endpoint)
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(otlp.service_name.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        // Only wick's own spans: dependencies' spans (h2, tower, ...) are not exported.
        let spans = tracing_subscriber::filter::Targets::new()
            .with_target("wick_router", tracing::Level::TRACE)
            .with_target("wick_scheduler", tracing::Level::TRACE);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("wick-router"))
            .with_filter(spans)
    });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    Ok(provider)
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Runs a generation request in its `request` span (the caller's `traceparent` its parent) and
/// logs one line when it is answered.
pub async fn trace_request(request: Request, next: Next) -> Response {
    let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{method} {path}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %path,
        http.response.status_code = Empty,
        trace_id = Empty,
    );
    // Without an exporter the span has no OpenTelemetry context: the caller's trace id (if
    // any) still goes into the logs.
    let _ = span.set_parent(parent.clone());
    let exported = span.context().span().span_context().trace_id();
    let caller = parent.span().span_context().trace_id();
    let trace_id = if exported != opentelemetry::trace::TraceId::INVALID {
        exported
    } else {
        caller
    };
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    let started = std::time::Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_millis() as u64,
            "{method} {path}"
        )
    });
    response
}
