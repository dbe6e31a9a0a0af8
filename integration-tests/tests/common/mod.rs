//! Starts the real `wick` launcher (which starts `wick-shard` and `wick-router`) on a free port
//! and a private socket path, and gives the tests its output and its process.
//!
//! The binaries are the ones cargo built next to the test executable (`cargo test --workspace`
//! builds every workspace binary first); tests never run cargo themselves.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wick_backend_candle::testing::{write_hf_model, TinyModelSpec};

/// Upper bound for the launcher to answer /health: loading a tiny model takes a second, a
/// 135M GGUF a few; the bound only keeps a broken build from hanging the suite.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);
/// Upper bound for the launcher to exit after a signal or a child's death.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/<profile>/`, where cargo puts the workspace binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A built workspace binary, or a panic that says how to build it.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace`, or run \
         `cargo test --workspace`, which builds them)",
        path.display()
    );
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A running launcher.
pub struct Wick {
    child: Option<Child>,
    pub port: u16,
    /// `--shard-uds-path`; shard 0 listens on `{uds}-0`.
    pub uds: PathBuf,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
    _dir: tempfile::TempDir,
}

impl Wick {
    /// Starts `wick` on a tiny random Llama written into a temp dir.
    pub fn start_tiny(extra: &[&str]) -> Self {
        Self::start_tiny_with(extra, |_| {})
    }

    /// Like [`Wick::start_tiny`], with `edit` applied to the model folder first.
    pub fn start_tiny_with(extra: &[&str], edit: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let model = dir.path().join("model");
        write_hf_model(&model, &TinyModelSpec::llama()).expect("writing the tiny model");
        edit(&model);
        let model = model.display().to_string();
        Self::start_in(dir, &model, extra)
    }

    /// Starts `wick --model-id model` with the test settings plus `extra`.
    pub fn start(model: &str, extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("a temp dir"), model, extra)
    }

    fn start_in(dir: tempfile::TempDir, model: &str, extra: &[&str]) -> Self {
        // Make sure the shard is built before blaming the launcher (the router is checked by
        // `wait_healthy`: some tests never get that far).
        binary("wick-shard");
        let port = free_port();
        let uds = dir.path().join("wick-server");
        // Tiny models need little KV memory; callers may ask for more.
        let kv_cache_memory: &[&str] = if extra.contains(&"--kv-cache-memory") {
            &[]
        } else {
            &["--kv-cache-memory", "64MiB"]
        };
        let mut child = Command::new(binary("wick"))
            .args(["--model-id", model, "--hostname", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .arg("--shard-uds-path")
            .arg(&uds)
            .args(["--shard-threads", "2", "--offline"])
            .args(kv_cache_memory)
            .args(["--graceful-termination-timeout", "30"])
            .args(extra)
            .env_remove("LOG_LEVEL")
            .env_remove("HOSTNAME")
            .env_remove("PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting wick");
        let log = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), log.clone()),
            collect(child.stderr.take().expect("piped stderr"), log.clone()),
        ];
        Self {
            child: Some(child),
            port,
            uds,
            log,
            readers,
            status: None,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the launcher printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("wick is running").id() as i32
    }

    /// The launcher's exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().expect("polling wick");
            }
        }
        self.status
    }

    /// Polls GET /health until 200; panics with the launcher's output if it exits first.
    pub async fn wait_healthy(&mut self) {
        binary("wick-router");
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                panic!(
                    "wick exited ({status}) before it was healthy:\n{}",
                    self.log()
                );
            }
            if let Ok(response) = client.get(self.url("/health")).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                start.elapsed() < STARTUP_TIMEOUT,
                "wick not healthy after {STARTUP_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// Waits for the launcher to exit (bounded), then for its output to be fully read.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.try_status() {
                break status;
            }
            assert!(
                start.elapsed() < EXIT_TIMEOUT,
                "wick still running after {EXIT_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// The pid the launcher logged for `child` (`shard-0`, `router`).
    pub fn child_pid(&self, child: &str) -> Option<i32> {
        let needle = format!("{child} started (pid ");
        let log = self.log();
        let start = log.find(&needle)? + needle.len();
        let end = start + log[start..].find(')')?;
        log[start..end].parse().ok()
    }

    /// Live processes whose command line mentions this deployment's socket path.
    pub fn processes_left(&self) -> Vec<i32> {
        processes_mentioning(&self.uds.display().to_string())
    }

    pub fn shard_socket(&self) -> PathBuf {
        wick_proto::rank_socket(&self.uds, 0)
    }
}

impl Drop for Wick {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- wick output ----\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(child.id() as i32, libc::SIGTERM);
                let start = Instant::now();
                while matches!(child.try_wait(), Ok(None)) {
                    if start.elapsed() > EXIT_TIMEOUT {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

fn collect(
    stream: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    })
}

pub fn send_signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; the pid is a child of this test.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Pids of live (not zombie) processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

/// The JSON payloads of an SSE body (`data: …` lines), in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.trim().to_string())
        .filter(|data| !data.is_empty())
        .collect()
}
