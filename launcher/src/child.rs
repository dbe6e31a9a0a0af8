//! One supervised child process: spawned in its own process group (so a terminal's Ctrl-C
//! reaches only the launcher, which then stops the children in order), its output forwarded,
//! and stopped with SIGTERM, a grace period, then SIGKILL.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::logs::{self, Stream, Tail};

/// How long to wait for a dead child's output to drain before reporting it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ManagedChild {
    /// `shard-0`, `router`: the prefix of every line it logs.
    pub name: String,
    child: Child,
    pid: u32,
    tail: Tail,
    forwarders: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

/// Finds a sibling binary: next to the running `wick` executable (an install or
/// `target/<profile>/`), else by name on `PATH`.
pub fn locate_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Renders a command line for the log, hiding the value after `--api-key`.
pub fn display_command(program: &Path, args: &[OsString]) -> String {
    let mut out = program.display().to_string();
    let mut redact_next = false;
    for arg in args {
        out.push(' ');
        if redact_next {
            out.push_str("<redacted>");
        } else {
            out.push_str(&arg.to_string_lossy());
        }
        redact_next = arg == "--api-key";
    }
    out
}

impl ManagedChild {
    pub fn spawn(name: &str, program: &Path, args: Vec<OsString>) -> Result<Self> {
        Self::spawn_with_key(name, program, args, None)
    }

    /// [`ManagedChild::spawn`], handing the child `api_key` in its `API_KEY` variable: not
    /// on its command line, which every local user can read in `/proc` (`ps`). Without one,
    /// the child gets no `API_KEY` at all.
    pub fn spawn_with_key(
        name: &str,
        program: &Path,
        args: Vec<OsString>,
        api_key: Option<&str>,
    ) -> Result<Self> {
        tracing::info!("starting {name}: {}", display_command(program, &args));
        let mut command = Command::new(program);
        match api_key {
            Some(key) => command.env("API_KEY", key),
            None => command.env_remove("API_KEY"),
        };
        command
            .args(&args)
            // Every setting reaches the children as a flag; these variables are the launcher's,
            // and the children's own parsers may read them differently (`HF_HUB_OFFLINE=1`).
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("JSON_OUTPUT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Safety net: a launcher that unwinds or returns early must not leave children.
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it is the
        // only call between fork and exec. It makes a launcher killed with SIGKILL still take
        // its children down (they get SIGTERM). The launcher spawns from the thread that runs
        // its single-threaded runtime, which lives as long as the process, so the signal is not
        // sent early by a thread exiting.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let pid = child
            .id()
            .context("the child exited before it was watched")?;
        let tail = Tail::default();
        let mut forwarders = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            forwarders.push(tokio::spawn(logs::forward(
                name.to_string(),
                stdout,
                Stream::Stdout,
                tail.clone(),
            )));
        }
        if let Some(stderr) = child.stderr.take() {
            forwarders.push(tokio::spawn(logs::forward(
                name.to_string(),
                stderr,
                Stream::Stderr,
                tail.clone(),
            )));
        }
        tracing::info!("{name} started (pid {pid})");
        Ok(Self {
            name: name.to_string(),
            child,
            pid,
            tail,
            forwarders,
            status: None,
        })
    }

    /// The exit status if the child has exited (remembered once seen).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // An error here means the child was already reaped: treat it as gone.
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(e) => {
                    tracing::warn!("cannot poll {}: {e}", self.name);
                    self.status = Some(std::os::unix::process::ExitStatusExt::from_raw(0));
                }
            }
        }
        self.status
    }

    /// Waits for the output forwarders to reach EOF (bounded), then returns the last lines.
    pub async fn drained_tail(&mut self) -> Vec<String> {
        for handle in self.forwarders.drain(..) {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, handle).await;
        }
        self.tail.lines()
    }

    /// SIGTERM, up to `grace` for it to exit, then SIGKILL. Returns the exit status.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_exited() {
            return Some(status);
        }
        tracing::info!("stopping {} (SIGTERM)", self.name);
        // The pid is still ours: the child has not been reaped (try_wait said so above).
        let pid = self.pid as libc::pid_t;
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        // A stopped child (SIGSTOP, a debugger, a hung rank someone froze) acts on SIGTERM only
        // once continued.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            libc::kill(pid, libc::SIGCONT);
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(
                    "{} did not exit within {}s of SIGTERM; killing it",
                    self.name,
                    grace.as_secs()
                );
                let _ = self.child.start_kill();
                self.child.wait().await.ok()
            }
        };
        self.status = status;
        let _ = self.drained_tail().await;
        status
    }

    /// SIGKILL now (a second Ctrl-C while stopping).
    pub fn kill_now(&mut self) {
        if self.try_exited().is_none() {
            let _ = self.child.start_kill();
        }
    }
}
