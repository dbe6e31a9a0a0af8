//! A `wick` deployment the stress scenarios start, watch, signal and check for leftovers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a deployment may take to answer `/health` (loading a model, warmup).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(600);

/// A running `wick` launcher on a loopback port with a private socket path; its output goes
/// to a log file in its own temp dir. Dropping it kills what is left of it.
pub struct Server {
    child: Child,
    pub port: u16,
    /// `--shard-uds-path`: rank `r` listens on `{uds}-{r}`.
    pub uds: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
    /// `/dev/shm` before the start, to find shared memory the deployment left behind.
    shm_before: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `wick --model-id model` on a free loopback port with `extra` arguments and
    /// waits until it answers `/health`.
    pub async fn start(wick: &Path, model: &str, extra: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let uds = dir.path().join("wick");
        let log = dir.path().join("wick.log");
        let out = std::fs::File::create(&log)?;
        let shm_before = shm_entries();
        let child = Command::new(wick)
            .args(["--model-id", model, "--hostname", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .arg("--shard-uds-path")
            .arg(&uds)
            .args(extra)
            .env_remove("PORT")
            .env_remove("HOSTNAME")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", wick.display()))?;
        let mut server = Self {
            child,
            port,
            uds,
            log,
            status: None,
            shm_before,
            _dir: dir,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("wick exited during startup ({status}):\n{}", self.log());
            }
            let health = client
                .get(self.url("/health"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if start.elapsed() > STARTUP_TIMEOUT {
                bail!("wick did not become healthy:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the launcher and its children printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pid the launcher logged for `name` (`shard-0`, `router`).
    pub fn child_pid(&self, name: &str) -> Option<u32> {
        let needle = format!("{name} started (pid ");
        let log = self.log();
        let start = log.find(&needle)? + needle.len();
        let end = start + log[start..].find(')')?;
        log[start..end].parse().ok()
    }

    /// Sends `signal` to the launcher.
    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// The launcher's exit status and how long after `since` it was seen, once it exits
    /// within `within`.
    pub async fn wait_exit(
        &mut self,
        since: Instant,
        within: Duration,
    ) -> Option<(ExitStatus, Duration)> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return Some((status, since.elapsed()));
            }
            if since.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Live processes whose command line names this deployment's socket path (the launcher's
    /// children all do), the socket files still on disk, and `/dev/shm` entries that were not
    /// there before it started.
    pub fn leftovers(&self) -> (Vec<u32>, Vec<PathBuf>, Vec<std::ffi::OsString>) {
        let needle = self.uds.display().to_string();
        let processes = processes_mentioning(&needle)
            .into_iter()
            .filter(|&p| self.status.is_none() || p != self.pid())
            .collect();
        let prefix = format!("{}-", self.uds.file_name().unwrap_or_default().display());
        let sockets = std::fs::read_dir(self.uds.parent().unwrap_or(Path::new(".")))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        let shm = shm_entries()
            .into_iter()
            .filter(|e| !self.shm_before.contains(e))
            .collect();
        (processes, sockets, shm)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.uds.display().to_string()) {
            send_signal(pid, libc::SIGCONT);
            send_signal(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shm_entries() -> Vec<std::ffi::OsString> {
    std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect()
}

pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a stale pid at worst gets ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Live (not zombie) processes whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The unlabelled gauges and counters of a Prometheus text page, labelled series summed
/// under their bare name.
pub async fn scrape(client: &reqwest::Client, server: &Server) -> anyhow::Result<Metrics> {
    let text = client
        .get(server.url("/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(Metrics::parse(&text))
}

#[derive(Debug, Clone, Default)]
pub struct Metrics(std::collections::HashMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut values = std::collections::HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if let Ok(v) = value.parse::<f64>() {
                *values.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
        Self(values)
    }

    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sum_labelled_series() {
        let m = Metrics::parse(
            "# HELP a x\n# TYPE a gauge\na 3\nb{x=\"1\"} 2\nb{x=\"2\"} 5\nc_bucket{le=\"+Inf\"} 1\n",
        );
        assert_eq!(m.get("a"), 3.0);
        assert_eq!(m.get("b"), 7.0);
        assert_eq!(m.get("missing"), 0.0);
    }
}
