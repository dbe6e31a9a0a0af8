//! `wick-bench serve` end to end, against a fake OpenAI-compatible server written here: a
//! hand-rolled HTTP/1.1 responder on tokio that streams SSE in chunked transfer encoding,
//! splitting events across HTTP chunks on purpose.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Prompt tokens the fake server reports in its usage chunk.
const PROMPT_TOKENS: u64 = 11;

/// How the fake server behaves.
#[derive(Clone, Copy)]
struct Flavor {
    /// Send the usage chunk (else the client must count chunks).
    usage: bool,
    /// Answer request k with HTTP 503 when k % n == n - 1.
    fail_every: Option<usize>,
    /// Stream an error object after two tokens when k % n == n - 1.
    stream_error_every: Option<usize>,
    /// End SSE lines with CRLF instead of LF.
    crlf: bool,
    /// The `ignore_eos` every request must carry; anything else is answered 400.
    ignore_eos: bool,
}

struct Server {
    addr: SocketAddr,
    /// Completion requests received.
    requests: AtomicUsize,
    /// Requests answered 400 because their body was not what the benchmark must send.
    malformed: AtomicUsize,
}

async fn spawn_server(flavor: Flavor) -> Arc<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Arc::new(Server {
        addr: listener.local_addr().unwrap(),
        requests: AtomicUsize::new(0),
        malformed: AtomicUsize::new(0),
    });
    let state = server.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            // Tokens are tiny writes: Nagle's algorithm would hold them back for an ACK.
            socket.set_nodelay(true).unwrap();
            tokio::spawn(serve_connection(socket, flavor, state.clone()));
        }
    });
    server
}

/// Reads one request: (method, path, body); `None` when the client closed the connection.
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = reader.read_u8().await.ok()?;
        head.push(byte);
    }
    let head = String::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse().unwrap_or(0));
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    Some((method, path, body))
}

async fn respond_json(socket: &mut BufReader<TcpStream>, status: &str, body: &Value) {
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket
        .get_mut()
        .write_all(response.as_bytes())
        .await
        .unwrap();
}

async fn write_chunk(socket: &mut BufReader<TcpStream>, bytes: &[u8]) -> std::io::Result<()> {
    let stream = socket.get_mut();
    stream
        .write_all(format!("{:x}\r\n", bytes.len()).as_bytes())
        .await?;
    stream.write_all(bytes).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await
}

async fn serve_connection(socket: TcpStream, flavor: Flavor, state: Arc<Server>) {
    let mut socket = BufReader::new(socket);
    while let Some((method, path, body)) = read_request(&mut socket).await {
        if method == "GET" && path == "/v1/models" {
            let models =
                json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]});
            respond_json(&mut socket, "200 OK", &models).await;
            continue;
        }
        let chat = path == "/v1/chat/completions";
        if method != "POST" || !(chat || path == "/v1/completions") {
            respond_json(&mut socket, "404 Not Found", &json!({"error": "no route"})).await;
            continue;
        }
        let k = state.requests.fetch_add(1, Ordering::SeqCst);
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let prompt_ok = if chat {
            request["messages"][0]["content"].is_string()
        } else {
            request["prompt"].is_string()
        };
        let well_formed = prompt_ok
            && request["stream"] == true
            && request["stream_options"]["include_usage"] == true
            && request["max_tokens"].is_u64()
            && request["model"].is_string()
            && (request["ignore_eos"] == true) == flavor.ignore_eos;
        if !well_formed {
            state.malformed.fetch_add(1, Ordering::SeqCst);
            respond_json(
                &mut socket,
                "400 Bad Request",
                &json!({"error": "malformed"}),
            )
            .await;
            continue;
        }
        let hits = |every: Option<usize>| every.is_some_and(|n| k % n == n - 1);
        if hits(flavor.fail_every) {
            let error = json!({"error": {"message": "overloaded", "type": "server_error"}});
            respond_json(&mut socket, "503 Service Unavailable", &error).await;
            continue;
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        if socket.get_mut().write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let max_tokens = request["max_tokens"].as_u64().unwrap();
        if stream_completion(
            &mut socket,
            flavor,
            chat,
            max_tokens,
            hits(flavor.stream_error_every),
        )
        .await
        .is_err()
        {
            return;
        }
    }
}

async fn stream_completion(
    socket: &mut BufReader<TcpStream>,
    flavor: Flavor,
    chat: bool,
    max_tokens: u64,
    stream_error: bool,
) -> std::io::Result<()> {
    let eol = if flavor.crlf { "\r\n" } else { "\n" };
    let event = |data: &str| format!(": keep-alive{eol}data: {data}{eol}{eol}");
    let choice = |text: &str, finish: Value| {
        if chat {
            json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
        } else {
            json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        }
    };
    let mut events = Vec::new();
    if chat {
        // The role-only opening chunk, which carries no token.
        let role =
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
        events.push(event(&role.to_string()));
    }
    for i in 0..max_tokens {
        if stream_error && i == 2 {
            events.push(event(&json!({"error": {"message": "boom"}}).to_string()));
            break;
        }
        events.push(event(&choice(&format!(" tok{i}"), Value::Null).to_string()));
    }
    if !stream_error {
        events.push(event(&choice("", json!("length")).to_string()));
        if flavor.usage {
            let usage = json!({"choices": [], "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": max_tokens,
                "total_tokens": PROMPT_TOKENS + max_tokens,
            }});
            events.push(event(&usage.to_string()));
        }
        events.push(event("[DONE]"));
    }
    for e in events {
        // Every event crosses an HTTP chunk boundary: the client must reassemble it.
        let (a, b) = e.as_bytes().split_at(e.len() / 2);
        write_chunk(socket, a).await?;
        write_chunk(socket, b).await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    socket.get_mut().write_all(b"0\r\n\r\n").await?;
    socket.get_mut().flush().await
}

struct Run {
    stdout: String,
    stderr: String,
    success: bool,
}

async fn wick_bench(args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wick-bench"))
        .args(args)
        .output()
        .await
        .unwrap();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        success: out.status.success(),
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wick-bench-serve-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A latency summary present and ordered.
fn summary(level: &Value, name: &str) -> (u64, f64) {
    let s = &level[name];
    let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{name}.{k} in {s}"));
    assert!(f("min") >= 0.0 && f("min") <= f("p50"), "{name}: {s}");
    assert!(
        f("p50") <= f("p90") && f("p90") <= f("p99") && f("p99") <= f("max"),
        "{name}: {s}"
    );
    assert!(f("avg") >= f("min") && f("avg") <= f("max"), "{name}: {s}");
    (s["count"].as_u64().unwrap(), f("p50"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_with_usage_writes_every_figure() {
    let server = spawn_server(Flavor {
        usage: true,
        fail_every: None,
        stream_error_every: None,
        crlf: false,
        ignore_eos: false,
    })
    .await;
    let dir = scratch("closed");
    let (json_path, svg_path) = (dir.join("run.json"), dir.join("run.svg"));
    let url = format!("http://{}", server.addr);
    let run = wick_bench(&[
        "serve",
        "--url",
        &url,
        "--concurrency",
        "1,4",
        "--duration",
        "1s",
        "--max-tokens",
        "8",
        "--prompt-tokens",
        "16",
        "--json",
        json_path.to_str().unwrap(),
        "--plot",
        svg_path.to_str().unwrap(),
    ])
    .await;
    assert!(
        run.success,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    println!("{}", run.stdout); // shown with --nocapture or on failure
    assert_eq!(server.malformed.load(Ordering::SeqCst), 0);
    assert!(run.stdout.contains("| c=1 |") && run.stdout.contains("| c=4 | TTFT |"));

    let report = read_json(&json_path);
    assert_eq!(report["kind"], "serve");
    assert_eq!(
        report["model"], "fake-model",
        "discovered through /v1/models"
    );
    assert_eq!(report["server_url"], url);
    assert_eq!(report["endpoint"], "completions");
    assert!(report["run"]["cores"].as_u64().unwrap() >= 1);
    assert!(report["run"]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(report["run"].get("git_revision").is_some());
    let p = &report["parameters"];
    assert_eq!(p["concurrency"], json!([1, 4]));
    assert_eq!(p["duration_s"], 1.0);
    assert_eq!(
        (p["max_tokens"].as_u64(), p["prompt_tokens"].as_u64()),
        (Some(8), Some(16))
    );

    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    let mut sent = 1; // the warmup request
    for (level, c) in levels.iter().zip([1, 4]) {
        assert_eq!(level["label"], format!("c={c}"));
        assert_eq!(level["concurrency"], c);
        let ok = level["requests_ok"].as_u64().unwrap();
        assert!(ok >= c, "{level}");
        assert_eq!(level["requests_failed"], 0);
        assert_eq!(level["errors"], json!({}));
        sent += ok as usize;
        assert_eq!(level["output_tokens"].as_u64().unwrap(), ok * 8);
        assert_eq!(level["input_tokens"].as_u64().unwrap(), ok * PROMPT_TOKENS);
        assert_eq!(level["output_tokens_estimated"], false);
        assert_eq!(level["input_tokens_estimated"], false);
        let duration = level["duration_s"].as_f64().unwrap();
        assert!(duration >= 1.0, "requests are sent for the whole second");
        let throughput = level["output_throughput"].as_f64().unwrap();
        assert!((throughput - (ok * 8) as f64 / duration).abs() < 1e-6);
        let input = level["input_throughput"].as_f64().unwrap();
        assert!((input - (ok * PROMPT_TOKENS) as f64 / duration).abs() < 1e-6);
        assert!(level["request_throughput"].as_f64().unwrap() > 0.0);
        let (n, ttft) = summary(level, "ttft_ms");
        assert_eq!(n, ok);
        let (n, itl) = summary(level, "itl_ms");
        assert_eq!(n, ok * 7, "one gap between each of the 8 tokens");
        let (n, e2e) = summary(level, "e2e_ms");
        assert_eq!(n, ok);
        assert!(ttft > 0.0 && itl > 0.0 && e2e > ttft, "{level}");
        summary(level, "tpot_ms");
        summary(level, "output_throughput_per_stream");
    }
    assert_eq!(server.requests.load(Ordering::SeqCst), sent);

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains(">\nc=4\n</text>"));

    // A run compared with itself: every ratio is one.
    let compare = wick_bench(&[
        "compare",
        json_path.to_str().unwrap(),
        json_path.to_str().unwrap(),
    ])
    .await;
    assert!(compare.success, "{}", compare.stderr);
    for c in [1, 4] {
        let row = compare
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("| c={c} |")))
            .unwrap();
        assert_eq!(row.matches("1.00×").count(), 4, "{row}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_without_usage_counts_chunks_and_failures() {
    let server = spawn_server(Flavor {
        usage: false,
        fail_every: Some(5),
        stream_error_every: Some(7),
        crlf: true,
        ignore_eos: true,
    })
    .await;
    let dir = scratch("open");
    let json_path = dir.join("run.json");
    let run = wick_bench(&[
        "serve",
        "--url",
        &format!("http://{}/v1/", server.addr),
        "--endpoint",
        "chat",
        "--model",
        "named",
        "--request-rate",
        "40",
        "--requests",
        "20",
        "--warmup",
        "0",
        "--ignore-eos",
        "--max-tokens",
        "5",
        "--json",
        json_path.to_str().unwrap(),
    ])
    .await;
    assert!(
        run.success,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    println!("{}", run.stdout); // shown with --nocapture or on failure
    assert_eq!(server.malformed.load(Ordering::SeqCst), 0);
    assert_eq!(server.requests.load(Ordering::SeqCst), 20);

    let report = read_json(&json_path);
    assert_eq!(
        (report["model"].as_str(), report["endpoint"].as_str()),
        (Some("named"), Some("chat"))
    );
    assert_eq!(report["parameters"]["request_rates"], json!([40.0]));
    assert_eq!(report["parameters"]["requests_per_level"], 20);
    let level = &report["levels"][0];
    assert_eq!(
        (level["label"].as_str(), level["request_rate"].as_f64()),
        (Some("rate=40"), Some(40.0))
    );
    // Requests 4, 9, 14, 19 get HTTP 503; 6 and 13 an error inside the stream.
    assert_eq!(level["requests_failed"], 6);
    assert_eq!(level["requests_ok"], 14);
    assert_eq!(level["errors"]["HTTP 503: overloaded"], 4);
    assert_eq!(level["errors"]["error in stream: boom"], 2);
    // No usage: the 5 content chunks of each request are counted, and flagged as estimated.
    assert_eq!(level["output_tokens"], 14 * 5);
    assert_eq!(level["output_tokens_estimated"], true);
    assert_eq!(level["input_tokens_estimated"], true);
    let (n, _) = summary(level, "itl_ms");
    assert_eq!(n, 14 * 4);
    assert!(run.stdout.contains("output tokens estimated"));
    assert!(run.stdout.contains("4 × HTTP 503: overloaded"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn unreachable_server_fails_at_warmup() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let run = wick_bench(&[
        "serve",
        "--url",
        &format!("http://{addr}"),
        "--model",
        "m",
        "--requests",
        "1",
    ])
    .await;
    assert!(!run.success);
    assert!(run.stderr.contains("warmup request"), "{}", run.stderr);
}
