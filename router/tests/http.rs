//! The HTTP API end to end: the real `wick-shard` binary on a tiny random model, the scheduler,
//! and the axum app served on a port-0 listener, driven with reqwest.

#[path = "../scheduler/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{connect_when_ready, start_shard, Shard};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use wick_router::server::{self, Config, ServerConfig, ValidationFlags};
use wick_scheduler::startup::{BackendInfo, ShardSetup};

/// A running shard + router.
struct Server {
    base: String,
    client: reqwest::Client,
    _shard: Shard,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self.post(path, body).await;
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// The raw body of a stream.
    async fn post_text(
        &self,
        path: &str,
        body: Value,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let r = self.post(path, body).await;
        let status = r.status();
        let headers = r.headers().clone();
        (status, headers, r.text().await.unwrap())
    }
}

fn default_config() -> Config {
    Config {
        server: ServerConfig {
            model_id: Some("tiny-llama".into()),
            api_key: None,
            cors_allow_origin: vec![],
            request_deadline: None,
            payload_limit: 2_000_000,
            max_client_batch_size: 4,
            max_concurrent_requests: 128,
        },
        validation: ValidationFlags {
            max_best_of: 2,
            max_stop_sequences: 4,
            max_top_n_tokens: 5,
            validation_workers: 2,
        },
    }
}

/// Starts a shard on a fresh tiny Llama and serves the router on 127.0.0.1:0, with the
/// configuration and the shard's answer adjusted by the two closures.
async fn start(
    tweak_config: impl FnOnce(&mut Config),
    tweak_backend: impl FnOnce(&mut BackendInfo),
) -> Server {
    let mut shard = start_shard(&["--kv-cache-memory", "1MiB"]);
    let mut config = default_config();
    tweak_config(&mut config);
    let setup = ShardSetup {
        master_shard_uds_path: shard.socket.clone(),
        max_input_tokens: Some(64),
        max_total_tokens: Some(128),
        max_batch_prefill_tokens: 256,
        max_batch_total_tokens: None,
        max_batch_size: None,
        waiting_served_ratio: 0.3,
        max_waiting_tokens: 20,
        max_concurrent_requests: config.server.max_concurrent_requests,
    };
    let (infer, mut backend) = connect_when_ready(&mut shard, &setup).await;
    tweak_backend(&mut backend);
    let app = server::app(&config, std::sync::Arc::new(infer), backend).expect("the app builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        _shard: shard,
    }
}

/// Runs an async test body on a two-thread runtime with a time limit.
fn run<Fut: std::future::Future<Output = ()>>(test: Fut) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(300), test)
                .await
                .expect("the test finished in time")
        });
}

/// Splits an SSE body into its `data:` payloads, asserting the framing byte for byte: every
/// event is exactly `data: <payload>\n\n`.
fn sse_payloads(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    body[..body.len() - 2]
        .split("\n\n")
        .filter(|e| !e.starts_with(':')) // keep-alive comments
        .map(|event| {
            let payload = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {event:?}"));
            assert!(!payload.contains('\n'), "one line per event: {event:?}");
            payload.to_string()
        })
        .collect()
}

fn greedy(max_new_tokens: u32) -> Value {
    json!({"max_new_tokens": max_new_tokens, "details": true})
}

#[test]
fn native_routes() {
    run(async {
        let s = start(|_| {}, |_| {}).await;

        let r = s
            .post(
                "/generate",
                json!({"inputs": "The capital of France is", "parameters": greedy(5)}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers().clone();
        assert_eq!(h["x-compute-type"], "cpu");
        for name in [
            "x-compute-time",
            "x-total-time",
            "x-validation-time",
            "x-queue-time",
            "x-inference-time",
            "x-time-per-token",
        ] {
            assert!(h.contains_key(name), "{name} missing");
        }
        let body: Value = r.json().await.unwrap();
        let details = &body["details"];
        let generated = details["generated_tokens"].as_u64().unwrap();
        assert!((1..=5).contains(&generated));
        assert_eq!(
            h["x-generated-tokens"].to_str().unwrap(),
            generated.to_string()
        );
        assert_eq!(
            details["tokens"].as_array().unwrap().len() as u64,
            generated
        );
        assert!(details["seed"].is_null(), "greedy requests report no seed");
        assert!(details["prefill"].as_array().unwrap().is_empty());
        assert!(
            details.get("top_tokens").is_none(),
            "omitted when not asked for"
        );
        let reason = details["finish_reason"].as_str().unwrap();
        assert!(["length", "eos_token"].contains(&reason));
        let text = body["generated_text"].as_str().unwrap().to_string();
        let prompt_tokens: u64 = h["x-prompt-tokens"].to_str().unwrap().parse().unwrap();

        // Same request, same greedy text; with the prompt prepended when asked.
        let (status, full) = s
            .post_json(
                "/generate",
                json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5, "return_full_text": true}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            full["generated_text"],
            format!("The capital of France is{text}")
        );
        assert!(full.get("details").is_none());

        // Prefill details and top tokens.
        let (status, b) = s
            .post_json(
                "/generate",
                json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2, "details": true, "decoder_input_details": true, "top_n_tokens": 3}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let prefill = b["details"]["prefill"].as_array().unwrap();
        assert_eq!(prefill.len() as u64, prompt_tokens);
        assert!(prefill[0]["logprob"].is_null());
        assert!(prefill[1]["logprob"].as_f64().unwrap() <= 0.0);
        let top = b["details"]["top_tokens"].as_array().unwrap();
        assert_eq!(top.len(), b["details"]["tokens"].as_array().unwrap().len());
        assert_eq!(top[0].as_array().unwrap().len(), 3);

        // Sampling reports its seed.
        let (_, b) = s
            .post_json(
                "/generate",
                json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": true, "do_sample": true, "seed": 7}}),
            )
            .await;
        assert_eq!(b["details"]["seed"], 7);

        // Compat route: an array, full text by default; stream=true streams.
        let (status, b) = s
            .post_json(
                "/",
                json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            b[0]["generated_text"],
            format!("The capital of France is{text}")
        );
        let (status, headers, body) = s
            .post_text(
                "/",
                json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "stream": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        assert!(!sse_payloads(&body).is_empty());

        // Tokenize: ids with byte offsets into the input.
        let (status, toks) = s
            .post_json("/tokenize", json!({"inputs": "Hello world"}))
            .await;
        assert_eq!(status, StatusCode::OK);
        let toks = toks.as_array().unwrap();
        assert!(!toks.is_empty());
        for t in toks {
            let (start, stop) = (
                t["start"].as_u64().unwrap() as usize,
                t["stop"].as_u64().unwrap() as usize,
            );
            assert_eq!(t["text"], &"Hello world"[start..stop]);
            assert!(t["id"].is_u64());
        }
        assert_eq!(toks.last().unwrap()["stop"], 11);

        // Info, health, models, metrics, docs.
        let info: Value = s.get("/info").await.json().await.unwrap();
        assert_eq!(info["model_id"], "tiny-llama");
        assert_eq!(info["max_input_tokens"], 64);
        assert_eq!(info["max_total_tokens"], 128);
        assert_eq!(info["max_client_batch_size"], 4);
        // Which CPU served it and where each weight format computes (an f32 model: candle).
        assert!(!info["cpu_model"].as_str().unwrap().is_empty(), "{info}");
        assert!(info["cpu_features"].is_array(), "{info}");
        assert_eq!(info["kernels"]["f32"], "candle dense f32", "{info}");
        assert_eq!(
            s.get("/").await.status(),
            StatusCode::OK,
            "GET / is a health check"
        );
        let health = s.get("/health").await;
        assert_eq!(health.status(), StatusCode::OK);
        assert!(health.text().await.unwrap().is_empty());
        let models: Value = s.get("/v1/models").await.json().await.unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "tiny-llama");
        let metrics = s.get("/metrics").await.text().await.unwrap();
        for name in [
            "tgi_request_count",
            "tgi_request_success",
            "tgi_request_duration_bucket",
            "tgi_request_input_length_bucket",
            "tgi_request_generated_tokens_bucket",
            "tgi_request_validation_duration",
            "tgi_request_queue_duration",
            "tgi_request_mean_time_per_token_duration",
            "tgi_batch_max_total_tokens",
        ] {
            assert!(metrics.contains(name), "{name} missing from /metrics");
        }
        let spec: Value = s.get("/api-doc/openapi.json").await.json().await.unwrap();
        for path in [
            "/generate",
            "/generate_stream",
            "/v1/chat/completions",
            "/v1/completions",
            "/health",
        ] {
            assert!(
                spec["paths"].get(path).is_some(),
                "{path} missing from the OpenAPI spec"
            );
        }
        let docs = s.get("/docs/").await;
        assert_eq!(docs.status(), StatusCode::OK);
        assert!(docs.text().await.unwrap().contains("swagger"));
    });
}

#[test]
fn generate_stream_framing_and_refusals() {
    run(async {
        let s = start(|_| {}, |_| {}).await;
        let request = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6, "details": true}});
        let (status, _, body) = s.post_text("/generate_stream", request.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let events: Vec<Value> = sse_payloads(&body)
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        assert!(!body.contains("[DONE]"), "TGI streams have no [DONE]");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["index"], i as u64 + 1);
            let last = i + 1 == events.len();
            assert_eq!(e["generated_text"].is_null(), !last);
            assert_eq!(e["details"].is_null(), !last);
        }
        let last = events.last().unwrap();
        assert_eq!(last["details"]["generated_tokens"], events.len() as u64);
        assert!(last["details"]["input_length"].as_u64().unwrap() > 0);

        // The streamed text is the non-stream text.
        let (_, b) = s.post_json("/generate", request).await;
        assert_eq!(last["generated_text"], b["generated_text"]);

        // A refused request gets its HTTP status and TGI's error body before any event (TGI
        // itself answers 200 and an error event; its clients read both the same way).
        let (status, headers, body) = s
            .post_text(
                "/generate_stream",
                json!({"inputs": "x", "parameters": {"decoder_input_details": true}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            body,
            "{\"error\":\"Input validation error: `decoder_input_details` == true is not supported when streaming tokens\",\"error_type\":\"validation\"}"
        );
    });
}

#[test]
fn validation_errors_have_tgi_statuses_and_messages() {
    run(async {
        let s = start(|_| {}, |_| {}).await;
        let long_prompt = "one two three four five six seven eight nine ten ".repeat(20);
        let cases = [
            (json!({"inputs": ""}), "`inputs` cannot be empty"),
            (
                json!({"inputs": "a", "parameters": {"temperature": 0.0}}),
                "`temperature` must be strictly positive",
            ),
            (
                json!({"inputs": "a", "parameters": {"repetition_penalty": 0.0}}),
                "`repetition_penalty` must be strictly positive",
            ),
            (
                json!({"inputs": "a", "parameters": {"frequency_penalty": 3.0}}),
                "`frequency_penalty` must be >= -2.0 and <= 2.0",
            ),
            (
                json!({"inputs": "a", "parameters": {"top_p": 1.0}}),
                "`top_p` must be > 0.0 and < 1.0",
            ),
            (
                json!({"inputs": "a", "parameters": {"typical_p": 1.5}}),
                "`typical_p` must be > 0.0 and < 1.0",
            ),
            (
                json!({"inputs": "a", "parameters": {"top_k": 0}}),
                "`top_k` must be strictly positive",
            ),
            (
                json!({"inputs": "a", "parameters": {"max_new_tokens": 0}}),
                "`max_new_tokens` must be strictly positive",
            ),
            (
                json!({"inputs": "a", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
                "`stop` supports up to 4 stop sequences. Given: 5",
            ),
            (
                json!({"inputs": "a", "parameters": {"top_n_tokens": 6}}),
                "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
            ),
            (
                json!({"inputs": "a", "parameters": {"truncate": 65}}),
                "`truncate` must be strictly positive and less than 64. Given: 65",
            ),
            (
                json!({"inputs": "a", "parameters": {"best_of": 3, "do_sample": true}}),
                "`best_of` must be > 0 and <= 2. Given: 3",
            ),
            (
                json!({"inputs": "a", "parameters": {"best_of": 2}}),
                "you must use sampling when `best_of` is > 1",
            ),
            (
                json!({"inputs": "a", "parameters": {"best_of": 2, "do_sample": true, "seed": 1}}),
                "`seed` must not be set when `best_of` > 1",
            ),
            (
                json!({"inputs": "a", "parameters": {"best_of": 2, "do_sample": true}}),
                "`best_of` > 1 is not supported by this server",
            ),
            (
                json!({"inputs": "a", "parameters": {"grammar": {"type": "ebnf", "value": "a"}}}),
                "grammar is not supported",
            ),
        ];
        for (body, message) in cases {
            let (status, b) = s.post_json("/generate", body.clone()).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(
                b["error"],
                format!("Input validation error: {message}"),
                "{body}"
            );
            assert_eq!(b["error_type"], "validation");
        }
        // Token limits (max_input_tokens 64, max_total_tokens 128).
        let (status, b) = s
            .post_json("/generate", json!({"inputs": long_prompt}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let msg = b["error"].as_str().unwrap();
        assert!(
            msg.starts_with(
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 128. Given: "
            ) || msg.starts_with(
                "Input validation error: `inputs` must have less than 64 tokens. Given: "
            ),
            "{msg}"
        );
        // A prompt over max_input_tokens whose total still fits max_total_tokens.
        let mut words = 1;
        let (over, count) = loop {
            let prompt = "one two three four five six seven eight nine ten ".repeat(words);
            let (_, toks) = s.post_json("/tokenize", json!({"inputs": prompt})).await;
            let count = toks.as_array().unwrap().len();
            if count > 64 {
                break (prompt, count);
            }
            words += 1;
        };
        assert!(count + 10 <= 128, "{count} tokens");
        let (status, b) = s
            .post_json(
                "/generate",
                json!({"inputs": over, "parameters": {"max_new_tokens": 10}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            b["error"],
            format!(
                "Input validation error: `inputs` must have less than 64 tokens. Given: {count}"
            )
        );
        let (status, b) = s
            .post_json(
                "/generate",
                json!({"inputs": "Hello", "parameters": {"max_new_tokens": 128}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(b["error"]
            .as_str()
            .unwrap()
            .contains("`inputs` tokens + `max_new_tokens` must be <= 128. Given: "));
        // Truncation keeps the last tokens and lets a long prompt through.
        let (status, b) = s
            .post_json(
                "/generate",
                json!({"inputs": long_prompt, "parameters": {"truncate": 8, "max_new_tokens": 2, "details": true, "decoder_input_details": true}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{b}");
        assert_eq!(b["details"]["prefill"].as_array().unwrap().len(), 8);

        // The OpenAI routes answer the same errors in OpenAI's shape.
        let (status, b) = s
            .post_json(
                "/v1/completions",
                json!({"prompt": "a", "temperature": -1.0}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            b["error"]["message"],
            "Input validation error: `temperature` must be strictly positive"
        );
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "validation");
        let metrics = s.get("/metrics").await.text().await.unwrap();
        assert!(metrics.contains("tgi_request_failure{err=\"validation\"}"));
    });
}

#[test]
fn body_rejections_and_auth_are_json() {
    run(async {
        let s = start(
            |config| {
                config.server.payload_limit = 1000;
                config.server.api_key = Some("s3cret".into());
            },
            |_| {},
        )
        .await;
        let send = |path: &'static str,
                    content_type: Option<&'static str>,
                    body: String,
                    key: Option<&'static str>| {
            let mut r = s.client.post(s.url(path)).body(body);
            if let Some(ct) = content_type {
                r = r.header("content-type", ct);
            }
            if let Some(k) = key {
                r = r.header("authorization", format!("Bearer {k}"));
            }
            async move {
                let resp = r.send().await.unwrap();
                let status = resp.status();
                let body: Value = resp.json().await.unwrap();
                (status, body)
            }
        };
        let json_ct = Some("application/json");
        let ok = Some("s3cret");

        let (status, b) = send("/generate", json_ct, "{\"inputs\":".into(), ok).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(b["error_type"], "bad_request");
        let (status, b) = send("/generate", json_ct, "{\"inputs\": 3}".into(), ok).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(b["error_type"], "validation");
        let (status, b) = send(
            "/generate",
            Some("text/plain"),
            "{\"inputs\":\"a\"}".into(),
            ok,
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(b["error_type"], "unsupported_media_type");
        let big = format!("{{\"inputs\":\"{}\"}}", "a".repeat(2000));
        let (status, b) = send("/generate", json_ct, big.clone(), ok).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(b["error_type"], "payload_too_large");
        let (status, b) = send("/v1/chat/completions", json_ct, big, ok).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "payload_too_large");
        let (status, b) = send("/v1/completions", json_ct, "[".into(), ok).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(b["error"]["message"].is_string());

        // Auth: missing or wrong key → 401 JSON; the right key passes.
        let body = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1}}).to_string();
        let (status, b) = send("/generate", json_ct, body.clone(), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(b["error_type"], "unauthorized");
        let (status, _) = send("/generate", json_ct, body.clone(), Some("wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, b) = send(
            "/v1/completions",
            json_ct,
            json!({"prompt": "a"}).to_string(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(b["error"]["type"], "authentication_error");
        let (status, _) = send("/generate", json_ct, body, ok).await;
        assert_eq!(status, StatusCode::OK);
        for open in [
            "/health",
            "/info",
            "/metrics",
            "/v1/models",
            "/api-doc/openapi.json",
        ] {
            assert_eq!(
                s.get(open).await.status(),
                StatusCode::OK,
                "{open} stays open"
            );
        }
    });
}

#[test]
fn over_limit_burst_gets_429() {
    run(async {
        let s = start(|config| config.server.max_concurrent_requests = 1, |_| {}).await;
        let body = json!({"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 60}});
        let requests = (0..6).map(|_| s.post_json("/generate", body.clone()));
        let answers = futures::future::join_all(requests).await;
        let ok = answers
            .iter()
            .filter(|(st, _)| *st == StatusCode::OK)
            .count();
        let overloaded: Vec<_> = answers
            .iter()
            .filter(|(st, _)| *st == StatusCode::TOO_MANY_REQUESTS)
            .collect();
        assert!(ok >= 1, "{answers:?}");
        assert!(!overloaded.is_empty(), "{answers:?}");
        assert_eq!(ok + overloaded.len(), answers.len());
        for (_, b) in overloaded {
            assert_eq!(b["error"], "Model is overloaded");
            assert_eq!(b["error_type"], "overloaded");
        }
        let metrics = s.get("/metrics").await.text().await.unwrap();
        assert!(metrics.contains("tgi_request_failure{err=\"overloaded\"}"));
    });
}

#[test]
fn chat_completions() {
    run(async {
        let s = start(|_| {}, |_| {}).await;
        let messages = json!([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is the capital of France?"}]);
        let (status, b) = s
            .post_json(
                "/v1/chat/completions",
                json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{b}");
        assert!(b["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(b["object"], "chat.completion");
        assert_eq!(b["model"], "tiny-llama");
        assert!(b["created"].as_u64().unwrap() > 1_600_000_000);
        let choice = &b["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
        let usage = &b["usage"];
        let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=8).contains(&completion_tokens));
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
        );
        let content = choice["message"]["content"].as_str().unwrap().to_string();

        // The template is applied: the same prompt through /generate gives the same text.
        let prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
        let (_, g) = s
            .post_json("/generate", json!({"inputs": prompt, "parameters": {"max_new_tokens": 8}, "add_special_tokens": false}))
            .await;
        assert_eq!(g["generated_text"], content.as_str());
        assert!(
            b["id"]
                != s.post_json(
                    "/v1/chat/completions",
                    json!({"messages": messages, "max_tokens": 1})
                )
                .await
                .1["id"]
        );

        // Stream: chunks, then the usage chunk, then [DONE].
        let (status, _, body) = s
            .post_text(
                "/v1/chat/completions",
                json!({"messages": messages, "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let payloads = sse_payloads(&body);
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let (usage_chunk, token_chunks) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["completion_tokens"], completion_tokens);
        assert_eq!(token_chunks.len() as u64, completion_tokens);
        let streamed: String = token_chunks
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(streamed, content);
        for (i, c) in token_chunks.iter().enumerate() {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert!(c["usage"].is_null());
            assert_eq!(
                c["choices"][0]["finish_reason"].is_null(),
                i + 1 < token_chunks.len()
            );
        }

        // Stop text is not returned, in either mode.
        let chars: Vec<char> = content.chars().collect();
        assert!(
            chars.len() >= 4,
            "the greedy answer is long enough to hold a stop: {content:?}"
        );
        let stop: String = chars[2..4].iter().collect();
        let expected = &content[..content.find(&stop).unwrap()];
        let request =
            json!({"messages": messages, "max_tokens": 8, "temperature": 0, "stop": stop});
        let (_, b) = s.post_json("/v1/chat/completions", request.clone()).await;
        assert_eq!(b["choices"][0]["message"]["content"], expected);
        assert_eq!(b["choices"][0]["finish_reason"], "stop");
        let mut streamed = request;
        streamed["stream"] = json!(true);
        let (_, _, body) = s.post_text("/v1/chat/completions", streamed).await;
        let text: String = sse_payloads(&body)
            .iter()
            .filter(|p| *p != "[DONE]")
            .map(|p| {
                serde_json::from_str::<Value>(p).unwrap()["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(text, expected);

        // n=2 with logprobs: two choices, indexed 0 and 1, each with its token logprobs.
        let (status, b) = s
            .post_json(
                "/v1/chat/completions",
                json!({"messages": messages, "max_tokens": 3, "n": 2, "seed": 5, "logprobs": true, "top_logprobs": 2}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{b}");
        let choices = b["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i as u64);
            let content = c["logprobs"]["content"].as_array().unwrap();
            assert!(!content.is_empty());
            assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
        }

        // Without a template: 422 template_error.
        drop(s);
        let s = start(|_| {}, |backend| backend.chat_template = None).await;
        let (status, b) = s
            .post_json("/v1/chat/completions", json!({"messages": messages}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(b["error"]["code"], "template_error");
        assert_eq!(b["error"]["message"], "Template error: template not found");
    });
}

#[test]
fn completions_with_prompt_lists_and_n() {
    run(async {
        let s = start(|_| {}, |_| {}).await;
        let (status, b) = s
            .post_json(
                "/v1/completions",
                json!({"prompt": ["The quick brown fox", "Once upon a time"], "n": 2, "max_tokens": 4, "temperature": 0, "logprobs": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{b}");
        assert!(b["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(b["object"], "text_completion");
        let choices = b["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i as u64);
            let lp = &c["logprobs"];
            assert_eq!(
                lp["tokens"].as_array().unwrap().len(),
                lp["token_logprobs"].as_array().unwrap().len()
            );
        }
        // Greedy copies of one prompt agree; prompts are answered in order.
        assert_eq!(choices[0]["text"], choices[1]["text"]);
        assert_eq!(choices[2]["text"], choices[3]["text"]);
        let (_, single) = s
            .post_json(
                "/v1/completions",
                json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
            )
            .await;
        assert_eq!(single["choices"][0]["text"], choices[2]["text"]);
        let usage = &b["usage"];
        let completion: u64 = choices.len() as u64; // at least one token each
        assert!(usage["completion_tokens"].as_u64().unwrap() >= completion);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );

        // Stream: every choice ends once, then usage, then [DONE].
        let (status, _, body) = s
            .post_text(
                "/v1/completions",
                json!({"prompt": ["The quick brown fox", "Once upon a time"], "n": 2, "max_tokens": 4, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let payloads = sse_payloads(&body);
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let (usage_chunk, token_chunks) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"], b["usage"]);
        let mut texts = vec![String::new(); 4];
        let mut finished = [0; 4];
        for c in token_chunks {
            let choice = &c["choices"][0];
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
            if !choice["finish_reason"].is_null() {
                finished[i] += 1;
            }
        }
        assert_eq!(finished, [1; 4]);
        for (i, text) in texts.iter().enumerate() {
            assert_eq!(text, choices[i]["text"].as_str().unwrap());
        }

        // Limits.
        let (status, b) = s
            .post_json(
                "/v1/completions",
                json!({"prompt": ["a", "b", "c", "d", "e"]}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            b["error"]["message"],
            "Number of prompts exceeds the maximum allowed batch size of 4"
        );
        assert_eq!(b["error"]["code"], "batch size exceeded");
        let (status, b) = s
            .post_json("/v1/completions", json!({"prompt": ["a", "b"], "n": 3}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(b["error"]["message"], "`n` must be >= 1 and <= 2. Given: 3");
        let (status, b) = s
            .post_json("/v1/completions", json!({"prompt": "a", "suffix": "b"}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(b["error"]["code"], "suffix not supported");
    });
}

/// Streams are cut when the client goes away; the server keeps serving.
#[test]
fn dropped_stream_does_not_wedge_the_server() {
    run(async {
        let s = start(|config| config.server.max_concurrent_requests = 1, |_| {}).await;
        let r = s
            .post(
                "/generate_stream",
                json!({"inputs": "Hello", "parameters": {"max_new_tokens": 50}}),
            )
            .await;
        let mut body = r.bytes_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "));
        drop(body);
        // The permit comes back once the server notices; then requests pass again.
        let mut status = StatusCode::TOO_MANY_REQUESTS;
        for _ in 0..100 {
            status = s
                .post(
                    "/generate",
                    json!({"inputs": "Hello", "parameters": {"max_new_tokens": 1}}),
                )
                .await
                .status();
            if status == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, StatusCode::OK);
    });
}

/// A backend that is down and full: the HTTP edge in front of it, with no shard at all.
struct DownBackend;

impl wick_scheduler::infer::Backend for DownBackend {
    fn try_acquire_permit(
        &self,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, wick_scheduler::request::InferError> {
        Err(wick_scheduler::request::InferError::Overloaded)
    }

    fn generate_stream(
        &self,
        _permit: tokio::sync::OwnedSemaphorePermit,
        _request: wick_scheduler::request::ValidRequest,
    ) -> Result<wick_scheduler::infer::EventStream, wick_scheduler::request::InferError> {
        panic!("generation without a permit")
    }

    fn health(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async { false })
    }
}

#[test]
fn the_http_edge_answers_for_any_backend() {
    run(async {
        let backend = BackendInfo {
            model_id: "down".into(),
            tokenizer_json: wick_backend_candle::testing::tiny_tokenizer()
                .to_string(false)
                .unwrap(),
            chat_template: None,
            bos_token: None,
            eos_token: None,
            max_input_tokens: 64,
            max_total_tokens: 128,
            max_batch_total_tokens: 1024,
            block_size: 16,
            dtype: "float32".into(),
            device_type: "cpu".into(),
            quantize: "f32".into(),
            world_size: 1,
            cpu_model: String::new(),
            cpu_features: Vec::new(),
            kernels: Default::default(),
            kv_cache_dtype: "f16".into(),
            kv_cache_bytes_per_token: 4096,
        };
        let app = server::app(&default_config(), std::sync::Arc::new(DownBackend), backend)
            .expect("the app builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::new();

        let health = client.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
        let native = client
            .post(format!("{base}/generate"))
            .json(&json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}}))
            .send()
            .await
            .unwrap();
        assert_eq!(native.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: Value = native.json().await.unwrap();
        assert_eq!(body["error_type"], "overloaded");
        let openai = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "hello", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(openai.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: Value = openai.json().await.unwrap();
        assert_eq!(body["error"]["message"], "Model is overloaded");
    });
}

/// SplitMix64, for the fuzz test's deterministic cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A value a hostile client might put anywhere.
fn nasty(rng: &mut Rng) -> Value {
    let deep = (0..64).fold(json!(1), |v, _| json!([v]));
    let palette = [
        Value::Null,
        json!(true),
        json!(-1),
        json!(0),
        json!(1),
        json!(1.5),
        json!(-0.0),
        json!(1e308),
        json!(-1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(4294967296u64),
        json!(""),
        json!("NaN"),
        json!("\u{0}\u{202e}\u{1f4a5}<|im_end|>{{ x }}{% for %}"),
        json!("x".repeat(20_000)),
        json!([]),
        json!({}),
        json!([1, "a", null]),
        json!({"role": "user", "content": "hi"}),
        json!({"type": "text", "text": "hi"}),
        deep,
    ];
    palette[rng.below(palette.len())].clone()
}

/// One mutation somewhere in `v`: a value replaced, a key removed or added, an array grown.
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    // A random node, as a JSON pointer.
    let mut pointer = String::new();
    let mut at = &*v;
    for _ in 0..rng.below(6) {
        let step = match at {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(rng.below(map.len())).unwrap();
                Some((key.replace('~', "~0").replace('/', "~1"), &map[key]))
            }
            Value::Array(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                Some((i.to_string(), &items[i]))
            }
            _ => None,
        };
        let Some((part, next)) = step else { break };
        pointer.push('/');
        pointer.push_str(&part);
        at = next;
    }
    let node = v
        .pointer_mut(&pointer)
        .expect("the pointer was just walked");
    match (rng.below(4), &mut *node) {
        (0, Value::Object(map)) if !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).cloned().unwrap();
            map.remove(&key);
        }
        (1, Value::Object(map)) => {
            let keys = [
                "stream", "n", "best_of", "grammar", "tools", "unknown", "messages",
            ];
            map.insert(keys[rng.below(keys.len())].into(), nasty(rng));
        }
        (2, Value::Array(items)) if !items.is_empty() => {
            let item = items[rng.below(items.len())].clone();
            for _ in 0..rng.below(100) {
                items.push(item.clone());
            }
        }
        _ => *node = nasty(rng),
    }
}

/// Thousands of mutated request bodies on every generation route: each gets an answer in its
/// route's shape (a 4xx with the error shape, or a well-formed 200), never a 5xx, and the
/// server serves a normal request afterwards. `WICK_FUZZ_CASES` raises the count (default 1500).
#[test]
fn mutated_requests_get_clear_answers_and_never_a_5xx() {
    run(async {
        let server = start(|_| {}, |_| {}).await;
        let seeds: Vec<(&str, Value)> = vec![
            (
                "/generate",
                json!({"inputs": "Hello there", "parameters": {
                    "max_new_tokens": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9,
                    "repetition_penalty": 1.1, "stop": ["x"], "seed": 3, "do_sample": true,
                    "details": true, "decoder_input_details": true, "top_n_tokens": 2,
                    "truncate": 10, "return_full_text": false,
                    "grammar": {"type": "json", "value": {"type": "object"}}}}),
            ),
            (
                "/generate_stream",
                json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": true,
                    "stop": ["a", "b"], "typical_p": 0.5, "frequency_penalty": 0.1}}),
            ),
            (
                "/v1/completions",
                json!({"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0.5,
                    "top_p": 0.9, "n": 1, "stop": ["x"], "logprobs": 2, "seed": 1,
                    "stream": false, "frequency_penalty": 0.1, "presence_penalty": 0.1,
                    "logit_bias": {"5": 1.0}, "echo": false}),
            ),
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "Again"}],
                    "max_tokens": 4, "temperature": 0.5, "logprobs": true, "top_logprobs": 2,
                    "stream": true, "response_format": {"type": "json_object"},
                    "tools": [{"type": "function", "function": {"name": "f", "parameters":
                        {"type": "object", "properties": {"a": {"type": "integer"}}}}}],
                    "tool_choice": "auto"}),
            ),
            ("/tokenize", json!({"inputs": "Hello"})),
        ];
        let cases: usize = std::env::var("WICK_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500);
        let mut rng = Rng(0x6874_7470);
        let mut statuses = std::collections::BTreeMap::new();
        for case in 0..cases {
            let (path, seed) = &seeds[rng.below(seeds.len())];
            let mut body = seed.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_json(&mut rng, &mut body);
            }
            let text = body.to_string();
            let r = server
                .client
                .post(server.url(path))
                .header("content-type", "application/json")
                .body(text.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("case {case} {path} {text}: {e}"));
            let status = r.status();
            *statuses.entry(status.as_u16()).or_insert(0) += 1;
            let stream = r
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
            let answer = r
                .text()
                .await
                .unwrap_or_else(|e| panic!("case {case}: {e}"));
            let context = || {
                format!(
                    "case {case} {path} {}: {status} {answer}",
                    &text[..text.len().min(400)]
                )
            };
            assert!(!status.is_server_error(), "{}", context());
            if stream {
                assert!(status.is_success(), "{}", context());
                for event in answer.split("\n\n").filter(|e| !e.is_empty()) {
                    let data = event
                        .strip_prefix("data: ")
                        .or_else(|| event.strip_prefix("event: error\ndata: "));
                    let data = data.unwrap_or_else(|| panic!("bad framing: {}", context()));
                    assert!(
                        data == "[DONE]" || serde_json::from_str::<Value>(data).is_ok(),
                        "unparsable event: {}",
                        context()
                    );
                }
                continue;
            }
            let value: Value = serde_json::from_str(&answer)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", context()));
            if status.is_client_error() {
                let message = if path.starts_with("/v1/") {
                    value["error"]["message"].as_str()
                } else {
                    value["error"].as_str()
                };
                assert!(message.is_some_and(|m| !m.is_empty()), "{}", context());
            }
        }
        eprintln!("{cases} mutated requests, answers by status: {statuses:?}");
        assert!(statuses.keys().any(|s| *s == 200), "{statuses:?}");
        assert!(statuses.keys().any(|s| *s >= 400), "{statuses:?}");
        let (status, out) = server
            .post_json(
                "/generate",
                json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
    });
}

/// A chat template that would loop for ages is cut off by its step budget: the request gets a
/// 422 naming the template, and the server goes on serving.
#[test]
fn a_runaway_chat_template_fails_the_request_not_the_server() {
    run(async {
        let looping =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let server = start(|_| {}, |b| b.chat_template = Some(looping.into())).await;
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2});
        let (status, out) = server.post_json("/v1/chat/completions", chat).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{out}");
        let message = out["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("fuel"), "{out}");
        let (status, out) = server
            .post_json(
                "/generate",
                json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
    });
}

/// An empty conversation is refused (OpenAI does too); it used to run with only the
/// template's generation prompt, for as many tokens as the deployment allows.
#[test]
fn an_empty_conversation_is_refused() {
    run(async {
        let server = start(|_| {}, |_| {}).await;
        let (status, out) = server
            .post_json(
                "/v1/chat/completions",
                json!({"model": "m", "messages": []}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{out}");
        assert!(
            out["error"]["message"]
                .as_str()
                .unwrap()
                .contains("messages"),
            "{out}"
        );
    });
}

/// CORS opens only to the origins the operator lists (closed by default: see the security
/// test of the whole deployment).
#[test]
fn cors_allows_only_the_listed_origins() {
    run(async {
        let server = start(
            |c| c.server.cors_allow_origin = vec!["https://app.example".into()],
            |_| {},
        )
        .await;
        let preflight = |origin: &'static str| {
            server
                .client
                .request(reqwest::Method::OPTIONS, server.url("/generate"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .send()
        };
        let ok = preflight("https://app.example").await.unwrap();
        assert_eq!(
            ok.headers().get("access-control-allow-origin").unwrap(),
            "https://app.example"
        );
        let other = preflight("https://evil.example").await.unwrap();
        assert!(other.headers().get("access-control-allow-origin").is_none());
    });
}

/// `--request-deadline`: a request still running when it passes is cancelled, with a 504 in
/// the route's shape or an error event that ends the stream; its KV blocks come back.
#[test]
fn requests_past_the_deadline_are_cancelled_cleanly() {
    run(async {
        let server = start(
            |c| c.server.request_deadline = Some(Duration::from_millis(1)),
            |_| {},
        )
        .await;
        let long = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 60}});
        let (status, out) = server.post_json("/generate", long.clone()).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{out}");
        assert_eq!(out["error_type"], "deadline_exceeded", "{out}");
        let chat = json!({"model": "m", "max_tokens": 60,
            "messages": [{"role": "user", "content": "hi"}]});
        let (status, out) = server.post_json("/v1/chat/completions", chat).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{out}");
        assert!(
            out["error"]["message"]
                .as_str()
                .unwrap()
                .contains("deadline"),
            "{out}"
        );
        let (status, _, body) = server.post_text("/generate_stream", long).await;
        assert_eq!(status, StatusCode::OK);
        let last = sse_payloads(&body).pop().unwrap();
        assert!(last.contains("deadline"), "{body}");
        // Nothing is left holding KV blocks or permits.
        for _ in 0..100 {
            let metrics = server.get("/metrics").await.text().await.unwrap();
            if metrics.contains("wick_kv_blocks_used 0")
                && metrics.contains("wick_requests_in_flight 0")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("blocks or permits still held after the deadline");
    });
}
