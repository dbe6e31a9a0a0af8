//! `--api-key` on every generation route of the real deployment (taken from its own OpenAPI
//! document, so a new route is covered the day it is added), streamed and not; the key in no
//! log line, error or command line; CORS closed by default; oversized headers refused.

mod common;

use common::{processes_mentioning, Wick};
use serde_json::{json, Value};

const KEY: &str = "k3y-that-must-not-leak-7f1c";

/// A body each generation route accepts.
fn body_for(path: &str, stream: bool) -> Value {
    match path {
        "/v1/chat/completions" => json!({"model": "m", "max_tokens": 2, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}),
        "/v1/completions" => {
            json!({"model": "m", "prompt": "hi", "max_tokens": 2, "stream": stream})
        }
        "/tokenize" => json!({"inputs": "hi"}),
        _ => json!({"inputs": "hi", "parameters": {"max_new_tokens": 2}, "stream": stream}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_every_generation_route_and_never_leaks() {
    let mut wick = Wick::start_tiny(&["--api-key", KEY]);
    wick.wait_healthy().await;
    let client = reqwest::Client::new();

    let doc: Value = client
        .get(wick.url("/api-doc/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let posts: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, item)| item.get("post").is_some())
        .map(|(path, _)| path.clone())
        .collect();
    assert!(posts.len() >= 6, "{posts:?}");
    for path in &posts {
        for stream in [false, true] {
            let body = body_for(path, stream);
            for key in [None, Some("wrong"), Some(&KEY[..KEY.len() - 1])] {
                let mut request = client.post(wick.url(path)).json(&body);
                if let Some(key) = key {
                    request = request.bearer_auth(key);
                }
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 401, "{path} stream={stream} key={key:?}");
                let error: Value = response.json().await.unwrap();
                let text = error.to_string();
                assert!(!text.contains(KEY), "{path}: {text}");
                let message = if path.starts_with("/v1/") {
                    &error["error"]["message"]
                } else {
                    &error["error"]
                };
                assert!(
                    message.as_str().is_some_and(|m| !m.is_empty()),
                    "{path}: {error}"
                );
            }
            let response = client
                .post(wick.url(path))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(
                response.status().is_success(),
                "{path} stream={stream}: {}",
                response.status()
            );
            let text = response.text().await.unwrap();
            assert!(!text.contains(KEY));
        }
    }
    // Reading routes stay open (health checks and scrapers have no key).
    for path in ["/health", "/info", "/metrics", "/v1/models"] {
        let status = client.get(wick.url(path)).send().await.unwrap().status();
        assert!(status.is_success(), "{path}: {status}");
    }

    // CORS is closed by default: no allow-origin header, preflight or not.
    let preflight = client
        .request(reqwest::Method::OPTIONS, wick.url("/generate"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(preflight
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let simple = client
        .get(wick.url("/info"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(simple
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    // A huge header is refused (or the connection closed), never served.
    let huge = client
        .post(wick.url("/generate"))
        .bearer_auth(KEY)
        .header("x-padding", "a".repeat(1 << 20))
        .json(&body_for("/generate", false))
        .send()
        .await;
    if let Ok(response) = huge {
        assert!(response.status().is_client_error(), "{}", response.status());
    }

    // The key is in no log line and on no child's command line (the launcher's own is the
    // operator's choice: `API_KEY=... wick` keeps it off that one too).
    for pid in processes_mentioning(&wick.uds.display().to_string()) {
        if pid == wick.pid() {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(KEY),
            "pid {pid}: {}",
            String::from_utf8_lossy(&cmdline)
        );
    }
    wick.signal(libc::SIGTERM);
    assert!(wick.wait_exit().await.success());
    let log = wick.log();
    assert!(!log.contains(KEY), "the key is in the log:\n{log}");
    assert!(
        log.contains("<redacted>") || !log.contains("--api-key"),
        "{log}"
    );
}
