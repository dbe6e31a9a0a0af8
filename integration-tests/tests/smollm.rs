//! SmolLM2-135M-Instruct (the README's default model, fetched by `make test` into `models/`)
//! served by the whole stack, whole and split over three tensor-parallel shards, answers a
//! factual question correctly with greedy decoding.

mod common;

use std::path::PathBuf;

use common::Wick;
use serde_json::json;

fn smollm_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// POSTs `body` to `/v1/chat/completions`; the JSON answer.
async fn chat(wick: &Wick, body: serde_json::Value) -> serde_json::Value {
    reqwest::Client::new()
        .post(wick.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("a response")
        .json()
        .await
        .expect("a JSON body")
}

/// Serves SmolLM2 with `shards` tensor-parallel shards and asks it for the capital of France.
async fn answers_the_capital_of_france(shards: &str) {
    let path = smollm_path();
    if !path.is_file() {
        // The model is fetched by `make test` (scripts/fetch-model.sh); without it there is
        // nothing to serve.
        eprintln!("{} absent: run scripts/fetch-model.sh", path.display());
        return;
    }
    // Warmup runs one full prefill of the budget; keep it small on a CPU test machine.
    let mut wick = Wick::start(
        path.to_str().expect("a UTF-8 path"),
        &[
            "--num-shard",
            shards,
            "--kv-cache-memory",
            "128MiB",
            "--max-batch-prefill-tokens",
            "512",
            "--max-input-tokens",
            "512",
            "--max-total-tokens",
            "1024",
        ],
    );
    wick.wait_healthy().await;
    let response = chat(
        &wick,
        json!({
            "model": "tgi",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            "max_tokens": 32,
            "temperature": 0.0,
        }),
    )
    .await;
    let content = response["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {response}"));
    assert!(content.contains("Paris"), "{content}");
    // Its Q4_1 layers and Q8_0 embedding (the tied lm_head) run on wick's own kernels.
    let info: serde_json::Value = reqwest::get(wick.url("/info"))
        .await
        .expect("a response")
        .json()
        .await
        .expect("a JSON body");
    for format in ["q4_1", "q8_0"] {
        let kernel = info["kernels"][format].as_str().unwrap_or_default();
        assert!(kernel.starts_with("wick "), "{format}: {info}");
    }
    answers_in_json(&wick).await;
}

/// Structured output on the real model, as OpenAI's SDK asks for it (`chat.completions.parse`
/// sends a `json_schema` response format): the answer is an instance of the schema, and
/// any-object JSON mode gives a JSON object.
async fn answers_in_json(wick: &Wick) {
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "title": "City"},
            "country": {"type": "string", "title": "Country"},
            "population": {"type": "integer", "title": "Population"}
        },
        "required": ["city", "country", "population"],
        "title": "City",
        "additionalProperties": false
    });
    let formats = [
        json!({"type": "json_schema", "json_schema": {"name": "City", "schema": schema, "strict": true}}),
        json!({"type": "json_object"}),
    ];
    for format in formats {
        let response = chat(wick, json!({
                "model": "tgi",
                "messages": [{"role": "user", "content": "Describe Paris as JSON: city, country and population."}],
                "max_tokens": 64,
                "temperature": 0.0,
                "response_format": format,
            })).await;
        let choice = &response["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{response}");
        let content = choice["message"]["content"].as_str().unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {response}"));
        assert!(value.is_object(), "{response}");
        if format["type"] == "json_schema" {
            assert!(
                value["city"].is_string() && value["country"].is_string(),
                "{content}"
            );
            assert!(value["population"].is_i64(), "{content}");
            assert_eq!(value.as_object().map(|o| o.len()), Some(3), "{content}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm_knows_the_capital_of_france() {
    answers_the_capital_of_france("1").await;
}

/// Its 9 heads and 3 KV heads split over 3 shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm_over_three_shards_knows_the_capital_of_france() {
    answers_the_capital_of_france("3").await;
}
