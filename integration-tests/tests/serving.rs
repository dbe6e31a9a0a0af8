//! The whole stack (launcher → shard → router) over HTTP on a tiny model: the TGI routes, the
//! OpenAI routes, health and metrics. One deployment serves every check, in order.

mod common;

use common::{sse_data, Wick};
use serde_json::{json, Value as Json};

const PROMPT: &str = "Hello world";

async fn post(client: &reqwest::Client, wick: &Wick, path: &str, body: Json) -> reqwest::Response {
    client
        .post(wick.url(path))
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn post_json(client: &reqwest::Client, wick: &Wick, path: &str, body: Json) -> Json {
    let response = post(client, wick, path, body).await;
    let status = response.status();
    let text = response.text().await.expect("a body");
    assert_eq!(status, 200, "POST {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
}

async fn post_sse(client: &reqwest::Client, wick: &Wick, path: &str, body: Json) -> Vec<String> {
    let response = post(client, wick, path, body).await;
    assert_eq!(response.status(), 200, "POST {path}");
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "POST {path}: content-type {content_type}"
    );
    sse_data(&response.text().await.expect("an SSE body"))
}

fn greedy(max_new_tokens: u32) -> Json {
    json!({"inputs": PROMPT, "parameters": {"max_new_tokens": max_new_tokens, "details": true}})
}

/// `/generate`: text and details; greedy decoding is deterministic.
async fn check_generate(client: &reqwest::Client, wick: &Wick) -> String {
    let first = post_json(client, wick, "/generate", greedy(6)).await;
    let text = first["generated_text"]
        .as_str()
        .expect("generated_text is a string")
        .to_string();
    let details = &first["details"];
    let generated = details["generated_tokens"]
        .as_u64()
        .expect("generated_tokens");
    assert!((1..=6).contains(&generated), "{first}");
    assert_eq!(
        details["tokens"].as_array().map(Vec::len),
        Some(generated as usize)
    );
    let reason = details["finish_reason"].as_str().expect("finish_reason");
    assert!(reason == "length" || reason == "eos_token", "{first}");
    if reason == "length" {
        assert_eq!(generated, 6);
    }
    let second = post_json(client, wick, "/generate", greedy(6)).await;
    assert_eq!(second["generated_text"], first["generated_text"]);
    text
}

/// `/generate_stream`: one event per token with `index` from 1; the last one carries the same
/// text as the non-streamed greedy request.
async fn check_generate_stream(client: &reqwest::Client, wick: &Wick, expected: &str) {
    let events = post_sse(client, wick, "/generate_stream", greedy(6)).await;
    assert!(!events.is_empty());
    let events: Vec<Json> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["index"], json!(i + 1), "{event}");
        assert!(event["token"]["id"].is_u64(), "{event}");
        if i + 1 < events.len() {
            assert!(event["generated_text"].is_null(), "{event}");
        }
    }
    let last = events.last().expect("a final event");
    assert_eq!(last["generated_text"], json!(expected), "{last}");
    assert_eq!(
        last["details"]["generated_tokens"],
        json!(events.len()),
        "{last}"
    );
}

/// `/v1/chat/completions`, plain and streamed (chunks then `[DONE]`).
async fn check_chat(client: &reqwest::Client, wick: &Wick) {
    let request = json!({
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 5,
        "temperature": 0.0,
    });
    let response = post_json(client, wick, "/v1/chat/completions", request.clone()).await;
    assert_eq!(response["object"], "chat.completion", "{response}");
    let choice = &response["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant", "{response}");
    assert!(choice["message"]["content"].is_string(), "{response}");
    let reason = choice["finish_reason"].as_str().expect("finish_reason");
    assert!(reason == "stop" || reason == "length", "{response}");
    let usage = &response["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let completion = usage["completion_tokens"]
        .as_u64()
        .expect("completion_tokens");
    assert!(prompt > 0 && (1..=5).contains(&completion), "{response}");
    assert_eq!(usage["total_tokens"], json!(prompt + completion));

    let mut stream_request = request;
    stream_request["stream"] = json!(true);
    let events = post_sse(client, wick, "/v1/chat/completions", stream_request).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Json> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect();
    assert!(!chunks.is_empty());
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
    }
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        json!(streamed),
        choice["message"]["content"],
        "streamed and plain greedy chat differ"
    );
    assert!(chunks.last().expect("a chunk")["choices"][0]["finish_reason"].is_string());
}

/// `/v1/completions` with a single prompt.
async fn check_completions(client: &reqwest::Client, wick: &Wick) {
    let response = post_json(
        client,
        wick,
        "/v1/completions",
        json!({"model": "tgi", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0}),
    )
    .await;
    assert_eq!(response["object"], "text_completion", "{response}");
    let choices = response["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "{response}");
    assert!(choices[0]["text"].is_string(), "{response}");
    let completion = response["usage"]["completion_tokens"]
        .as_u64()
        .expect("completion_tokens");
    assert!((1..=4).contains(&completion), "{response}");
}

/// A request the router must reject: 422 with TGI's error shape.
async fn check_validation_error(client: &reqwest::Client, wick: &Wick) {
    let response = post(
        client,
        wick,
        "/generate",
        json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}),
    )
    .await;
    assert_eq!(response.status(), 422);
    let body: Json = response.json().await.expect("a JSON error");
    assert_eq!(body["error_type"], "validation", "{body}");
    assert!(body["error"].is_string(), "{body}");
}

/// `/health` and `/metrics` after the requests above.
async fn check_health_and_metrics(client: &reqwest::Client, wick: &Wick) {
    let health = client
        .get(wick.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    let metrics = client
        .get(wick.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("metrics text");
    for name in [
        "tgi_request_count",
        "tgi_request_success",
        "tgi_request_generated_tokens",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // The shard's step profile: the linear layers and attention are parts of the forward pass.
    let sum = |name: &str| -> f64 {
        let prefix = format!("{name}_sum{{method=\"prefill\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} has no prefill sum in /metrics:\n{text}"))
    };
    let forward = sum("tgi_batch_forward_duration");
    let linear = sum("wick_batch_forward_linear_duration");
    let attention = sum("wick_batch_forward_attention_duration");
    assert!(
        linear > 0.0 && attention > 0.0 && linear + attention <= forward,
        "linear {linear} s + attention {attention} s against forward {forward} s"
    );
    // Requests stepped one at a time with nothing queued: the shard computed steps ahead, and
    // its waits between the steps of a running batch are measured.
    let value = |line_prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line_prefix} in /metrics:\n{text}"))
    };
    assert!(value("wick_batch_run_ahead_total ") >= 1.0, "{text}");
    assert!(
        value("wick_batch_shard_idle_duration_count{method=\"decode\"} ") >= 1.0,
        "{text}"
    );
    let validation_failures = text
        .lines()
        .any(|l| l.starts_with("tgi_request_failure") && l.contains("validation"));
    assert!(
        validation_failures,
        "no validation failure counted:\n{text}"
    );
}

/// A bounded schema: the tiny model's noise must still come out as a valid instance.
fn item_schema() -> Json {
    json!({
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "label": {"type": "string", "maxLength": 6},
            "done": {"type": "boolean"}
        },
        "required": ["id", "label", "done"],
        "additionalProperties": false
    })
}

fn check_item(text: &str) {
    let v: Json = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(
        (0..=999).contains(&v["id"].as_i64().expect("id")),
        "{text:?}"
    );
    assert!(
        v["label"].as_str().expect("label").chars().count() <= 6,
        "{text:?}"
    );
    assert!(
        v["done"].is_boolean() && v.as_object().unwrap().len() == 3,
        "{text:?}"
    );
}

/// Structured output: TGI's `parameters.grammar` (JSON schema and regex, plain and streamed),
/// OpenAI's `response_format`, and the errors for bad grammars.
async fn check_structured_output(client: &reqwest::Client, wick: &Wick) {
    let json_grammar = json!({"type": "json", "value": item_schema()});
    let body =
        json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 60, "grammar": json_grammar}});
    let out = post_json(client, wick, "/generate", body.clone()).await;
    check_item(out["generated_text"].as_str().expect("generated_text"));
    let events = post_sse(client, wick, "/generate_stream", body).await;
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Json>(e).ok())
        .filter_map(|e| e["token"]["text"].as_str().map(str::to_string))
        .collect();
    check_item(&streamed);

    let regex = json!({"type": "regex", "value": "(red|green|blue)-[0-9]{2}"});
    let body = json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "grammar": regex, "do_sample": true, "seed": 4}});
    let out = post_json(client, wick, "/generate", body).await;
    let text = out["generated_text"].as_str().expect("generated_text");
    let (color, number) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
    assert!(["red", "green", "blue"].contains(&color), "{text:?}");
    assert!(
        number.len() == 2 && number.bytes().all(|b| b.is_ascii_digit()),
        "{text:?}"
    );

    let chat = json!({
        "model": "tgi",
        "messages": [{"role": "user", "content": "An item, please"}],
        "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": item_schema(), "strict": true}},
    });
    let out = post_json(client, wick, "/v1/chat/completions", chat).await;
    check_item(
        out["choices"][0]["message"]["content"]
            .as_str()
            .expect("content"),
    );
    assert_eq!(out["choices"][0]["finish_reason"], "stop", "{out}");

    let bad = json!({"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "(unclosed"}}});
    let response = post(client, wick, "/generate", bad).await;
    assert_eq!(response.status(), 422);
    let body: Json = response.json().await.expect("a JSON error");
    assert_eq!(body["error_type"], "validation", "{body}");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains("grammar is not valid"), "{body}");
    let unknown =
        json!({"inputs": PROMPT, "parameters": {"grammar": {"type": "ebnf", "value": "x"}}});
    let response = post(client, wick, "/generate", unknown).await;
    assert_eq!(response.status(), 422);
    let chat = json!({
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
    });
    let response = post(client, wick, "/v1/chat/completions", chat).await;
    assert_eq!(response.status(), 422);
    let body: Json = response.json().await.expect("a JSON error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("grammar is not valid"), "{body}");
}

/// OpenAI tool calling on the tiny model: whatever its noise, a required or named call parses
/// and its arguments match the function's schema, whole or streamed as deltas.
async fn check_tools(client: &reqwest::Client, wick: &Wick) {
    let tools = json!([
        {"type": "function", "function": {"name": "set_item", "description": "Stores an item",
            "parameters": item_schema()}},
        {"type": "function", "function": {"name": "ping"}}
    ]);
    let named = json!({"type": "function", "function": {"name": "set_item"}});
    for choice in [json!("required"), named] {
        let request = json!({
            "model": "tgi",
            "messages": [{"role": "user", "content": "Store an item"}],
            "max_tokens": 200,
            "temperature": 0.0,
            "tools": tools,
            "tool_choice": choice,
            "parallel_tool_calls": false,
        });
        let out = post_json(client, wick, "/v1/chat/completions", request.clone()).await;
        let choice_out = &out["choices"][0];
        assert_eq!(choice_out["finish_reason"], "tool_calls", "{out}");
        assert!(choice_out["message"]["content"].is_null(), "{out}");
        let calls = choice_out["message"]["tool_calls"]
            .as_array()
            .expect("tool_calls");
        assert_eq!(calls.len(), 1, "{out}");
        assert_eq!(calls[0]["type"], "function");
        assert!(
            calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{out}"
        );
        let name = calls[0]["function"]["name"].as_str().expect("name");
        let arguments = calls[0]["function"]["arguments"]
            .as_str()
            .expect("arguments");
        match name {
            "set_item" => check_item(arguments),
            "ping" => assert_eq!(arguments, "{}", "{out}"),
            other => panic!("unknown function {other}: {out}"),
        }
        if choice != "required" {
            assert_eq!(name, "set_item", "{out}");
        }

        let mut stream_request = request;
        stream_request["stream"] = json!(true);
        let events = post_sse(client, wick, "/v1/chat/completions", stream_request).await;
        let mut streamed_name = None;
        let mut streamed_arguments = String::new();
        let mut finish = None;
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let chunk: Json = serde_json::from_str(event).expect("a JSON chunk");
            let choice = &chunk["choices"][0];
            for call in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert_eq!(call["index"], 0, "{chunk}");
                if let Some(n) = call["function"]["name"].as_str() {
                    assert!(streamed_name.is_none(), "the name comes once: {chunk}");
                    assert!(
                        call["id"].is_string() && call["type"] == "function",
                        "{chunk}"
                    );
                    streamed_name = Some(n.to_string());
                }
                streamed_arguments.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        assert_eq!(finish.as_deref(), Some("tool_calls"), "{events:?}");
        assert_eq!(streamed_name.as_deref(), Some(name), "{events:?}");
        let streamed: Json = serde_json::from_str(&streamed_arguments).expect("JSON arguments");
        let whole: Json = serde_json::from_str(arguments).unwrap();
        assert_eq!(streamed, whole, "greedy: streamed and whole calls agree");
    }

    let unknown = json!({
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    });
    let response = post(client, wick, "/v1/chat/completions", unknown).await;
    assert_eq!(response.status(), 422);
    let body: Json = response.json().await.expect("a JSON error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("Tool with name nope not found"), "{body}");
}

/// The OpenAI request fields beyond sampling: `logit_bias`, `min_tokens`, `echo`, `user`.
async fn check_openai_fields(client: &reqwest::Client, wick: &Wick) {
    // A +100 bias on one token makes greedy decoding choose only it.
    let tokenized = post_json(client, wick, "/tokenize", json!({"inputs": "robot"})).await;
    let id = tokenized[0]["id"].as_u64().expect("a token id");
    let body = json!({
        "model": "tgi", "prompt": PROMPT, "max_tokens": 5, "temperature": 0.0,
        "logit_bias": {id.to_string(): 100}, "user": "someone",
    });
    let out = post_json(client, wick, "/v1/completions", body).await;
    let text = out["choices"][0]["text"].as_str().expect("text");
    let token = tokenized[0]["text"].as_str().unwrap();
    assert_eq!(text, token.repeat(5), "{out}");

    // With its end id banned for 12 tokens and a stop sequence it would hit, the answer still
    // has 12 tokens.
    let body = json!({
        "model": "tgi", "prompt": PROMPT, "max_tokens": 12, "min_tokens": 12,
        "temperature": 0.0, "logit_bias": {id.to_string(): 100}, "stop": [token],
    });
    let out = post_json(client, wick, "/v1/completions", body).await;
    assert_eq!(out["usage"]["completion_tokens"], 12, "{out}");

    // Echo: the prompt comes first, with its own logprobs (the first one null).
    let body = json!({
        "model": "tgi", "prompt": PROMPT, "max_tokens": 3, "temperature": 0.0, "echo": true,
        "logprobs": 1,
    });
    let out = post_json(client, wick, "/v1/completions", body).await;
    let choice = &out["choices"][0];
    assert!(
        choice["text"].as_str().unwrap().starts_with(PROMPT),
        "{out}"
    );
    let logprobs = &choice["logprobs"];
    let prompt_tokens = out["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let completion_tokens = out["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), prompt_tokens + completion_tokens, "{out}");
    assert_eq!(tokens[..prompt_tokens].concat(), PROMPT, "{out}");
    assert!(logprobs["token_logprobs"][0].is_null(), "{out}");
    assert!(logprobs["token_logprobs"][1].is_number(), "{out}");

    let bad = json!({"model": "tgi", "prompt": PROMPT, "logit_bias": {"nope": 1}});
    let response = post(client, wick, "/v1/completions", bad).await;
    assert!(response.status().is_client_error());
    let body: Json = response.json().await.expect("a JSON error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("logit_bias"), "{body}");
}

/// Every route of the HTTP API, as the checks above.
async fn check_every_route(client: &reqwest::Client, wick: &Wick) {
    let text = check_generate(client, wick).await;
    check_generate_stream(client, wick, &text).await;
    check_chat(client, wick).await;
    check_completions(client, wick).await;
    check_structured_output(client, wick).await;
    check_tools(client, wick).await;
    check_openai_fields(client, wick).await;
    check_validation_error(client, wick).await;
    check_health_and_metrics(client, wick).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_end_to_end() {
    let mut wick = Wick::start_tiny(&[]);
    wick.wait_healthy().await;
    check_every_route(&reqwest::Client::new(), &wick).await;

    wick.signal(libc::SIGTERM);
    let status = wick.wait_exit().await;
    assert!(status.success(), "{status}:\n{}", wick.log());
    assert!(!wick.shard_socket().exists());
    assert_eq!(wick.processes_left(), Vec::<i32>::new());
}

/// Token ids and logprobs of a greedy `/generate` with details.
async fn greedy_tokens(client: &reqwest::Client, wick: &Wick) -> Vec<(u64, f64)> {
    let out = post_json(client, wick, "/generate", greedy(8)).await;
    out["details"]["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens: {out}"))
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["logprob"].as_f64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tensor_parallel_shards_serve_like_one() {
    let client = reqwest::Client::new();
    let mut one = Wick::start_tiny(&[]);
    one.wait_healthy().await;
    let expected = greedy_tokens(&client, &one).await;
    one.signal(libc::SIGTERM);
    assert!(one.wait_exit().await.success());

    let mut wick = Wick::start_tiny(&["--num-shard", "2"]);
    wick.wait_healthy().await;
    let log = wick.log();
    assert!(log.contains("shard-1 started"), "{log}");
    let got = greedy_tokens(&client, &wick).await;
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.0, e.0, "tokens differ: {got:?} vs {expected:?}");
        assert!(
            (g.1 - e.1).abs() <= 1e-4,
            "logprobs differ: {got:?} vs {expected:?}"
        );
    }
    check_every_route(&client, &wick).await;

    wick.signal(libc::SIGTERM);
    let status = wick.wait_exit().await;
    assert!(status.success(), "{status}:\n{}", wick.log());
    for rank in 0..2 {
        let socket = wick_proto::rank_socket(&wick.uds, rank);
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    assert_eq!(wick.processes_left(), Vec::<i32>::new());
}
