//! Where and when a run happened, recorded with its figures so that two runs can be compared
//! knowingly.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    /// Cores this process may use (`std::thread::available_parallelism`).
    pub cores: usize,
    /// `git rev-parse HEAD` of the working directory, when it is a git checkout.
    pub git_revision: Option<String>,
    /// UTC, RFC 3339.
    pub timestamp: String,
    pub wick_bench_version: String,
    /// The CPU's model name, so runs on different hosts are told apart.
    #[serde(default)]
    pub cpu_model: String,
    /// The CPU features wick's kernels use that this CPU has.
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// The best level wick's kernels run at on this CPU (avx512, avx2, scalar).
    #[serde(default)]
    pub kernel_level: String,
}

impl RunInfo {
    pub fn collect() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            git_revision: git_revision(),
            timestamp: rfc3339(SystemTime::now()),
            wick_bench_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu_model: wick_kernels::cpu_model(),
            cpu_features: wick_kernels::present_cpu_features()
                .into_iter()
                .map(String::from)
                .collect(),
            kernel_level: wick_kernels::Level::detected().to_string(),
        }
    }
}

fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, computed here rather than through a date crate.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> String {
        rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn known_instants() {
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(951_868_799), "2000-02-29T23:59:59Z");
        assert_eq!(at(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(at(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn collect_reports_at_least_one_core() {
        let info = RunInfo::collect();
        assert!(info.cores >= 1);
        assert!(info.timestamp.ends_with('Z'));
    }
}
