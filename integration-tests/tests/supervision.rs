//! The launcher's supervision with the real children: SIGTERM during a stream stops everything
//! cleanly; a shard that dies or hangs, or a tensor-parallel rank that hangs, takes the
//! deployment down with a non-zero exit that names it.

mod common;

use common::{send_signal, Wick};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_stops_everything_cleanly() {
    let mut wick = Wick::start_tiny(&[]);
    wick.wait_healthy().await;
    let response = reqwest::Client::new()
        .post(wick.url("/generate_stream"))
        .json(&json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 200}}))
        .send()
        .await
        .expect("a stream");
    assert_eq!(response.status(), 200);
    let mut response = response;
    let first = response
        .chunk()
        .await
        .expect("a readable stream")
        .expect("a first event");
    assert!(String::from_utf8_lossy(&first).contains("data:"));

    wick.signal(libc::SIGTERM);
    // The router drains in-flight requests before it exits: the stream runs to its end.
    let mut rest = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let last = common::sse_data(&rest)
        .pop()
        .unwrap_or_else(|| panic!("no event after SIGTERM:\n{}", wick.log()));
    let last: serde_json::Value = serde_json::from_str(&last).expect("a JSON event");
    assert!(last["generated_text"].is_string(), "stream cut: {last}");
    let status = wick.wait_exit().await;
    assert!(status.success(), "{status}:\n{}", wick.log());
    assert!(!wick.shard_socket().exists(), "{}", wick.log());
    assert_eq!(wick.processes_left(), Vec::<i32>::new(), "{}", wick.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shard_takes_the_deployment_down() {
    let mut wick = Wick::start_tiny(&[]);
    wick.wait_healthy().await;
    let shard = wick
        .child_pid("shard-0")
        .unwrap_or_else(|| panic!("no shard pid in the log:\n{}", wick.log()));
    assert!(wick.processes_left().contains(&shard));

    send_signal(shard, libc::SIGKILL);
    let status = wick.wait_exit().await;
    let log = wick.log();
    assert!(!status.success(), "wick exited with success:\n{log}");
    assert!(
        log.contains("shard-0 exited unexpectedly"),
        "the dead shard is not named:\n{log}"
    );
    assert!(!wick.shard_socket().exists(), "{log}");
    assert_eq!(wick.processes_left(), Vec::<i32>::new(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_shard_is_killed_and_named_and_its_request_fails() {
    let mut wick = Wick::start_tiny(&["--shard-health-timeout", "2"]);
    wick.wait_healthy().await;
    let shard = wick
        .child_pid("shard-0")
        .unwrap_or_else(|| panic!("no shard pid in the log:\n{}", wick.log()));
    send_signal(shard, libc::SIGSTOP);
    // Without the health watch this request would wait for the stopped shard forever.
    let response = reqwest::Client::new()
        .post(wick.url("/generate"))
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4}}))
        .send()
        .await;
    if let Ok(response) = response {
        assert!(!response.status().is_success(), "{}", response.status());
    }
    let status = wick.wait_exit().await;
    let log = wick.log();
    assert!(!status.success(), "wick exited with success:\n{log}");
    assert!(
        log.contains("shard-0 did not answer its health check"),
        "the hung shard is not named:\n{log}"
    );
    assert!(!wick.shard_socket().exists(), "{log}");
    assert_eq!(wick.processes_left(), Vec::<i32>::new(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_tensor_parallel_rank_takes_the_set_down_by_name() {
    let mut wick = Wick::start_tiny(&["--num-shard", "2"]);
    wick.wait_healthy().await;
    let rank1 = wick
        .child_pid("shard-1")
        .unwrap_or_else(|| panic!("no shard-1 pid in the log:\n{}", wick.log()));
    send_signal(rank1, libc::SIGKILL);
    let status = wick.wait_exit().await;
    let log = wick.log();
    assert!(!status.success(), "wick exited with success:\n{log}");
    assert!(
        log.contains("shard-1 exited unexpectedly"),
        "the dead rank is not named:\n{log}"
    );
    assert_eq!(wick.processes_left(), Vec::<i32>::new(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_tensor_parallel_rank_fails_the_request_and_the_set_by_name() {
    let mut wick = Wick::start_tiny(&["--num-shard", "2", "--collective-timeout", "2"]);
    wick.wait_healthy().await;
    let rank1 = wick
        .child_pid("shard-1")
        .unwrap_or_else(|| panic!("no shard-1 pid in the log:\n{}", wick.log()));
    send_signal(rank1, libc::SIGSTOP);
    let response = reqwest::Client::new()
        .post(wick.url("/generate"))
        .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4}}))
        .send()
        .await
        .expect("an HTTP answer");
    assert!(!response.status().is_success(), "{}", response.status());
    let body = response.text().await.unwrap();
    assert!(body.contains("rank(s) 1 did not answer"), "{body}");
    let status = wick.wait_exit().await;
    let log = wick.log();
    assert!(!status.success(), "wick exited with success:\n{log}");
    assert!(log.contains("shard-0 exited unexpectedly"), "{log}");
    assert_eq!(wick.processes_left(), Vec::<i32>::new(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_that_cannot_load_fails_the_launch() {
    // Valid config and tokenizer (the launcher's checks pass), unreadable weights (the shard
    // fails while loading).
    let mut wick = Wick::start_tiny_with(&[], |model| {
        std::fs::write(model.join("model.safetensors"), b"not safetensors").expect("write");
    });
    let status = wick.wait_exit().await;
    let log = wick.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("shard-0 exited unexpectedly"), "{log}");
    // The shard's own error is repeated in the report of its death.
    let report = log
        .split("last output of shard-0")
        .nth(1)
        .unwrap_or_else(|| panic!("no report of shard-0's output:\n{log}"));
    assert!(report.contains("model.safetensors"), "{log}");
    assert!(!log.contains("starting router"), "{log}");
    assert!(!wick.shard_socket().exists(), "{log}");
    assert_eq!(wick.processes_left(), Vec::<i32>::new(), "{log}");
}
