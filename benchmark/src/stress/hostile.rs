//! Bodies built to break a server: malformed, mistyped, out of range, oversized, nested
//! without end. Each must get an answer (a 4xx for most; a few are legal and may run) and
//! never a 5xx, a hang, or harm to the requests around it.

use serde_json::json;

use super::load::Payload;

/// How many hostile bodies there are; [`body`] takes an index below it.
pub const COUNT: usize = 18;

/// The `index`-th hostile request: its path and payload.
pub fn body(index: usize) -> (&'static str, Payload) {
    let long_prompt = "lorem ipsum ".repeat(200_000);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    match index % COUNT {
        0 => (
            "/generate",
            Payload::Raw("application/json", b"{\"inputs\": ".to_vec()),
        ),
        1 => ("/generate", Payload::Json(json!({"inputs": 5}))),
        2 => ("/generate", Payload::Json(json!({"inputs": ""}))),
        3 => (
            "/generate",
            Payload::Json(json!({"inputs": "hi", "parameters": {"max_new_tokens": 4294967295u64}})),
        ),
        4 => (
            "/generate_stream",
            Payload::Json(json!({"inputs": "hi", "parameters": {"temperature": -1}})),
        ),
        5 => (
            "/generate",
            Payload::Raw("application/json", nested.into_bytes()),
        ),
        6 => (
            "/v1/completions",
            Payload::Raw(
                "application/json",
                b"{\"prompt\": \"\xff\xfe\xfd\"}".to_vec(),
            ),
        ),
        7 => ("/generate", Payload::Json(json!({"inputs": long_prompt}))),
        8 => (
            "/v1/chat/completions",
            Payload::Json(json!({"model": "m", "messages": []})),
        ),
        9 => (
            "/v1/chat/completions",
            Payload::Json(json!({"model": "m", "messages": [{"role": "alien", "content": 7}]})),
        ),
        10 => (
            "/generate",
            Payload::Json(json!({"inputs": "hi", "parameters": {"stop": vec!["x"; 1000]}})),
        ),
        11 => (
            "/v1/chat/completions",
            Payload::Json(json!({
                "model": "m", "n": 100000,
                "messages": [{"role": "user", "content": "hi"}],
            })),
        ),
        12 => (
            "/v1/completions",
            Payload::Json(json!({"prompt": "hi", "logit_bias": {"not-a-token": 5, "-3": 1e30}})),
        ),
        13 => (
            "/generate",
            Payload::Raw("text/plain", b"inputs=hi".to_vec()),
        ),
        14 => (
            "/generate",
            Payload::Json(json!({
                "inputs": "hi",
                "parameters": {"grammar": {"type": "regex", "value": "(unclosed"}},
            })),
        ),
        15 => (
            "/generate",
            Payload::Raw(
                "application/json",
                b"{\"inputs\": \"hi\", \"parameters\": {\"temperature\": 1e400}}".to_vec(),
            ),
        ),
        16 => (
            "/v1/chat/completions",
            Payload::Json(json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            })),
        ),
        _ => (
            "/generate",
            Payload::Json(
                json!({"inputs": "hi", "parameters": {"top_n_tokens": 1000000, "best_of": 99}}),
            ),
        ),
    }
}
