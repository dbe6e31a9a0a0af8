//! What operators deploy around wick, held to what wick really is: the Grafana dashboard
//! (`deploy/grafana/wick-dashboard.json`) queries only metrics a real deployment's `/metrics`
//! serves; the Kubernetes manifests (`deploy/kubernetes`) validate and use only what wick
//! reads.

mod common;

use std::collections::BTreeSet;

use common::Wick;
use serde_json::{json, Value};

/// Every `tgi_*` / `wick_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (expr[i..].starts_with("tgi_") || expr[i..].starts_with("wick_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.push(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every string under a key named `key`, anywhere in `value`.
fn strings_at(value: &Value, key: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_at(v, key, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_at(v, key, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_wick_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/wick-dashboard.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    strings_at(&dashboard["panels"], "expr", &mut exprs);
    strings_at(&dashboard["templating"], "definition", &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 15, "{used:?}");

    let mut wick = Wick::start_tiny(&[]);
    wick.wait_healthy().await;
    let client = reqwest::Client::new();
    // A served request, a streamed one and a refused one: every series the dashboard reads
    // exists once a deployment has seen each (failures appear with the first failure).
    let generate = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 3}});
    for path in ["/generate", "/generate_stream"] {
        let response = client.post(wick.url(path)).json(&generate).send().await;
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    let refused = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 0}});
    let response = client.post(wick.url("/generate")).json(&refused).send();
    assert_eq!(response.await.unwrap().status(), 422);
    let metrics = client.get(wick.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which /metrics does not export:\n{metrics}"
    );
}

/// `deploy/kubernetes`: valid for Kubernetes' schemas (strict) and for wick (probes on
/// `/health`, only environment variables wick reads, a grace period covering the drain); see
/// `scripts/check-manifests.sh`.
#[test]
fn the_kubernetes_manifests_are_valid_for_kubernetes_and_for_wick() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/check-manifests.sh");
    let output = std::process::Command::new(script)
        .arg(common::binary("wick"))
        .output()
        .expect("running scripts/check-manifests.sh");
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
