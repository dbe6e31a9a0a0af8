//! The API contract: schemathesis, a property-based tester from PyPI, generates requests from
//! the OpenAPI document a real deployment (a tiny model) serves, valid and invalid ones, for
//! every operation, and checks each answer against that document: status codes, content types,
//! headers, body schemas (stream events included), valid requests accepted, invalid ones
//! refused, no 5xx. A fixed seed and a bounded number of cases; zero failures.
//! `make contract` is the longer run against the default model.

mod common;

use common::Wick;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_the_api_document_does_not_describe() {
    let mut wick = Wick::start_tiny(&[
        "--max-input-tokens",
        "64",
        "--max-total-tokens",
        "96",
        "--max-batch-prefill-tokens",
        "128",
        "--max-client-batch-size",
        "4",
        "--max-stop-sequences",
        "4",
        "--max-top-n-tokens",
        "5",
        "--request-deadline",
        "60",
    ]);
    wick.wait_healthy().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/contract-check.sh");
    let output = tokio::process::Command::new(script)
        .arg(wick.url(""))
        .arg("20")
        .output()
        .await
        .expect("running scripts/contract-check.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}\n--- wick's log (tail) ---\n{}",
        tail(&wick.log(), 60)
    );
    // The run really tested every operation.
    assert!(stdout.contains("Tested: 11"), "{stdout}");
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
