//! The real `wick-shard` binary on a fresh tiny Llama, and the scheduler connected to it; shared
//! by the scheduler's tests and the router's HTTP tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use wick_backend_candle::testing::{write_hf_model, ShardProcess, TinyModelSpec};
use wick_scheduler::infer::Infer;
use wick_scheduler::startup::{connect, BackendInfo, ShardSetup};

/// The shard process (killed on drop, its log printed when a test fails) and its socket.
pub struct Shard {
    process: ShardProcess,
    /// Its socket (`{uds}-0`).
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// `target/<profile>/wick-shard`, next to the directory of this test executable.
fn shard_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(format!("wick-shard{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it with cargo build -p wick-backend-candle",
        bin.display()
    );
    bin
}

/// Starts `wick-shard` (one thread, offline) on a fresh tiny Llama with `args` added.
pub fn start_shard(args: &[&str]) -> Shard {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_hf_model(&model, &TinyModelSpec::llama()).unwrap();
    let uds = dir.path().join("shard");
    let log = dir.path().join("shard.log");
    let mut all = vec!["--threads", "1", "--offline"];
    all.extend_from_slice(args);
    Shard {
        process: ShardProcess::spawn(&shard_binary(), &model, &uds, &all, log),
        socket: PathBuf::from(format!("{}-0", uds.display())),
        _dir: dir,
    }
}

/// Connects the scheduler to `shard` once it answers (`setup` names its socket).
pub async fn connect_when_ready(shard: &mut Shard, setup: &ShardSetup) -> (Infer, BackendInfo) {
    for _ in 0..600 {
        if let Some(status) = shard.process.child.try_wait().unwrap() {
            panic!("wick-shard exited early: {status}");
        }
        if shard.socket.exists() {
            if let Ok(pair) = connect(setup).await {
                return pair;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the scheduler could not connect to wick-shard");
}
