//! `wick-bench serve` against a real wick on a tiny model: a few seconds of load, then every
//! figure of the JSON report checked for presence and sanity.

mod common;

use common::{binary, Wick};
use serde_json::Value as Json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wick_bench_serve_measures_a_real_wick() {
    let mut wick = Wick::start_tiny(&[]);
    wick.wait_healthy().await;
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("report.json");
    let url = wick.url("");
    let output = tokio::process::Command::new(binary("wick-bench"))
        .args([
            "serve",
            "--url",
            url.trim_end_matches('/'),
            "--endpoint",
            "completions",
        ])
        .args([
            "--concurrency",
            "1,3",
            "--duration",
            "2s",
            "--prompt-tokens",
            "16",
        ])
        .args(["--max-tokens", "8", "--ignore-eos", "--json"])
        .arg(&json_path)
        .output()
        .await
        .expect("wick-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wick-bench failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        wick.log()
    );
    assert!(stdout.contains("| c=3 |"), "{stdout}");

    let report: Json = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["kind"], "serve");
    assert!(report["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        report["run"]["cores"].as_u64().is_some_and(|c| c >= 1),
        "{report}"
    );
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2);
    for level in levels {
        let ok = level["requests_ok"].as_u64().unwrap();
        assert!(ok >= 1, "{level}");
        assert_eq!(level["requests_failed"], 0, "{level}");
        // Token counts come from wick's usage, not estimates: 8 tokens per request.
        assert_eq!(level["output_tokens_estimated"], false, "{level}");
        assert_eq!(level["input_tokens_estimated"], false, "{level}");
        assert_eq!(level["output_tokens"].as_u64().unwrap(), 8 * ok, "{level}");
        assert!(level["input_tokens"].as_u64().unwrap() >= ok, "{level}");
        for rate in [
            "request_throughput",
            "input_throughput",
            "output_throughput",
        ] {
            assert!(
                level[rate].as_f64().is_some_and(|v| v > 0.0),
                "{rate}: {level}"
            );
        }
        for summary in [
            "ttft_ms",
            "itl_ms",
            "tpot_ms",
            "output_throughput_per_stream",
        ] {
            let s = &level[summary];
            let (min, p50, p99, max) = (
                s["min"].as_f64().unwrap(),
                s["p50"].as_f64().unwrap(),
                s["p99"].as_f64().unwrap(),
                s["max"].as_f64().unwrap(),
            );
            assert!(
                0.0 < min && min <= p50 && p50 <= p99 && p99 <= max,
                "{summary}: {s}"
            );
        }
    }
    wick.signal(libc::SIGTERM);
    assert!(wick.wait_exit().await.success(), "{}", wick.log());
}
