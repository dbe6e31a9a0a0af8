//! The stress suite's short version (CI): `wick-bench stress` runs every scenario against real
//! deployments of a tiny model (mixed load with hang-ups and hostile bodies, slow and stuck
//! clients, KV pool pressure, SIGTERM drain, SIGKILL and SIGSTOP of the shard, a short soak)
//! and exits non-zero when one finds a problem. The full version (10 000 requests, a 30-minute
//! soak, the default model) is `make stress`.
//!
//! Time bounds are widened here (exit within 30 s, soak tolerances) so that a slow or shared CI
//! host cannot fail the run; lost, garbled, 5xx, leaks, hangs and exit codes are checked as in
//! the full run.

mod common;

use common::{bin_dir, binary};
use wick_backend_candle::testing::{write_hf_model, TinyModelSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stress_scenario_passes_on_a_tiny_model() {
    binary("wick-shard");
    binary("wick-router");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_hf_model(&model, &TinyModelSpec::llama()).unwrap();
    let json = dir.path().join("stress.json");
    let output = tokio::process::Command::new(binary("wick-bench"))
        .arg("stress")
        .arg("--model-id")
        .arg(&model)
        .arg("--wick")
        .arg(bin_dir().join("wick"))
        .args(["--wick-arg=--offline", "--wick-arg=--shard-threads=2"])
        .args(["--wick-arg=--kv-cache-memory=64MiB"])
        .args([
            "--requests",
            "400",
            "--concurrency",
            "16",
            "--max-tokens",
            "12",
        ])
        .args([
            "--soak",
            "15s",
            "--rss-tolerance",
            "0.5",
            "--throughput-tolerance",
            "1",
        ])
        .args([
            "--exit-within",
            "30s",
            "--hang-timeout",
            "3",
            "--kv-pool",
            "400",
        ])
        .arg("--json")
        .arg(&json)
        .env_remove("PORT")
        .env_remove("HOSTNAME")
        .output()
        .await
        .expect("wick-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for scenario in ["mixed", "slow", "kv", "drain", "kill", "hang", "soak"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{scenario}:")))
            .unwrap_or_else(|| panic!("no {scenario} line:\n{stdout}"));
        assert!(line.ends_with("| ok"), "{line}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mixed = &report["scenarios"][0];
    assert_eq!(mixed["scenario"], "mixed");
    let figure = |name: &str| -> serde_json::Value {
        mixed["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f[0] == name)
            .unwrap_or_else(|| panic!("no figure {name}: {mixed}"))[1]
            .clone()
    };
    // The load really mixed its kinds of clients.
    assert!(figure("completed").as_u64().unwrap() > 200, "{mixed}");
    assert!(figure("hung up").as_u64().unwrap() > 10, "{mixed}");
    assert_eq!(figure("lost"), 0);
    assert_eq!(figure("garbled"), 0);
}
