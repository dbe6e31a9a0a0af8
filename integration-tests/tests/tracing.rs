//! Traces: `wick --otlp-endpoint` against an OTLP/gRPC receiver this test runs. Each request
//! sent with a W3C `traceparent` becomes a `request` span of that trace, child of the caller's
//! span, with `validation`, `queue`, `prefill` and `decode` under it (token counts, batch size
//! and finish reason as attributes), exported under the service name; the log line of the
//! request carries its trace id. Spans still in the exporter's batch leave at shutdown.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::Wick;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::json;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Any::StringValue(s)) => s.clone(),
                Some(Any::IntValue(i)) => i.to_string(),
                Some(Any::BoolValue(b)) => b.to_string(),
                Some(Any::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .map(|r| text(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for s in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attributes: text(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_traced_under_the_callers_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let mut wick = Wick::start_tiny(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-service-name",
        "wick-under-test",
    ]);
    wick.wait_healthy().await;
    let client = reqwest::Client::new();
    let traces = [
        (
            "/generate",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "00f067aa0ba902b7",
        ),
        (
            "/generate_stream",
            "0af7651916cd43dd8448eb211c80319c",
            "b7ad6b7169203331",
        ),
    ];
    for (path, trace, parent) in traces {
        let response = client
            .post(wick.url(path))
            .header("traceparent", format!("00-{trace}-{parent}-01"))
            .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    // Shutdown flushes the spans still waiting in the exporter's batch.
    wick.signal(libc::SIGTERM);
    assert!(wick.wait_exit().await.success(), "{}", wick.log());

    let spans = receiver.0.lock().unwrap().clone();
    for (path, trace, parent) in traces {
        let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
        let request = ours
            .iter()
            .find(|s| s.name == format!("POST {path}"))
            .unwrap_or_else(|| panic!("no request span for {path} in {ours:#?}\n{spans:#?}"));
        assert_eq!(request.parent, parent, "{request:?}");
        assert_eq!(request.service, "wick-under-test");
        assert_eq!(request.attributes["http.response.status_code"], "200");
        for phase in ["validation", "queue", "prefill", "decode"] {
            let span = ours
                .iter()
                .find(|s| s.name == phase)
                .unwrap_or_else(|| panic!("{path}: no {phase} span in {ours:#?}"));
            assert_eq!(
                span.parent, request.span_id,
                "{phase} is not the request's child"
            );
        }
        let phase = |name: &str| ours.iter().find(|s| s.name == name).unwrap();
        assert_eq!(phase("decode").attributes["generated_tokens"], "3");
        assert_eq!(phase("decode").attributes["finish_reason"], "length");
        assert_eq!(phase("prefill").attributes["batch_size"], "1");
        assert!(
            phase("validation").attributes["input_tokens"]
                .parse::<u32>()
                .unwrap()
                > 0
        );
        // The request's log line names its trace.
        assert!(
            wick.log().contains(&format!("trace_id={trace}")),
            "no log line with trace_id={trace}:\n{}",
            wick.log()
        );
    }
}
