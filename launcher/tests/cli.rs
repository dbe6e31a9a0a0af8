//! The real `wick` binary rejects bad command lines before any child process starts: exit code
//! 1, one clear error line, no shard socket created.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run {
    output: Output,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }

    /// Exit code 1, `needle` in the output, and no child was started.
    fn assert_rejected(&self, needle: &str) {
        let text = self.text();
        assert_eq!(self.output.status.code(), Some(1), "{text}");
        assert!(text.contains(needle), "expected `{needle}` in:\n{text}");
        assert!(!text.contains("starting shard-0"), "{text}");
        assert!(!socket(&self.uds).exists());
    }
}

fn socket(uds: &Path) -> PathBuf {
    wick_proto::rank_socket(uds, 0)
}

/// A tiny Llama folder in Hugging Face layout: 4 attention heads, 2 KV heads. The launcher reads
/// only its config; the tokenizer and weights are never loaded, as no shard starts.
fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
}

/// Runs `wick` on a tiny model folder (or `model` when given) with `extra` flags.
fn wick(model: Option<&str>, extra: &[&str]) -> Run {
    wick_with_env(model, extra, &[])
}

fn wick_with_env(model: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_model(&model_dir);
    let uds = dir.path().join("wick");
    let model = model.map_or_else(|| model_dir.display().to_string(), str::to_string);
    let output = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["--model-id", &model, "--shard-uds-path"])
        .arg(&uds)
        .args(["--port", "0", "--offline"])
        .args(extra)
        .env_remove("LOG_LEVEL")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        output,
        uds,
        _dir: dir,
    }
}

#[test]
fn max_input_tokens_must_be_below_max_total_tokens() {
    wick(
        None,
        &["--max-input-tokens", "64", "--max-total-tokens", "64"],
    )
    .assert_rejected("`max_input_tokens` must be < `max_total_tokens`");
}

#[test]
fn shards_must_split_the_heads_evenly() {
    // The tiny model's 4 attention heads and 2 KV heads cannot go to 3 shards.
    wick(None, &["--num-shard", "3"]).assert_rejected(
        "cannot be split over 3 shards: its 4 attention heads and 2 KV heads must both be \
         multiples of the number of shards",
    );
}

#[test]
fn missing_model_path_is_named() {
    wick(Some("/nonexistent/wick/model"), &[])
        .assert_rejected("/nonexistent/wick/model does not exist");
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    config["model_type"] = serde_json::json!("gpt2");
    std::fs::write(&config_path, config.to_string()).unwrap();
    wick(Some(dir.path().to_str().unwrap()), &[]).assert_rejected("GPT2LMHeadModel");
}

#[test]
fn malformed_size_is_a_usage_error() {
    // clap's own errors exit with 2 and name the flag.
    let run = wick(None, &["--kv-cache-memory", "lots"]);
    assert_eq!(run.output.status.code(), Some(2), "{}", run.text());
    assert!(run.text().contains("--kv-cache-memory"), "{}", run.text());
    assert!(!socket(&run.uds).exists());
}

#[test]
fn json_output_reports_errors_as_json_lines() {
    let run = wick(None, &["--num-shard", "3", "--json-output"]);
    run.assert_rejected("cannot be split");
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(event["level"], "ERROR");
    assert!(event["message"].as_str().unwrap().contains("3 shards"));
}

#[test]
fn boolean_env_vars_accept_the_hub_spelling() {
    // `HF_HUB_OFFLINE=1` is how the Hub libraries spell it; it must not be a usage error.
    let run = wick_with_env(
        None,
        &["--num-shard", "3"],
        &[("HF_HUB_OFFLINE", "1"), ("JSON_OUTPUT", "1")],
    );
    run.assert_rejected("cannot be split");
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    assert!(stdout.trim_start().starts_with('{'), "not JSON: {stdout}");
}
