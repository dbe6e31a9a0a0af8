//! `wick-bench compare A.json B.json`: how run B fares against run A, level by level.

use std::path::Path;

use anyhow::{bail, Context};

use crate::report::{LevelResult, ServeReport, SERVE_KIND};
use crate::stats::Summary;

pub fn load(path: &Path) -> anyhow::Result<ServeReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if value["kind"] != SERVE_KIND {
        bail!(
            "{} is not a `wick-bench serve --json` report",
            path.display()
        );
    }
    serde_json::from_value(value).with_context(|| format!("{}: unexpected report", path.display()))
}

/// `b / a`, or a dash when `a` is zero or either is missing.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a != 0.0 => format!("{:.2}×", b / a),
        _ => "–".into(),
    }
}

fn figure(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.2}"))
}

fn p(s: &Option<Summary>, f: fn(&Summary) -> f64) -> Option<f64> {
    s.as_ref().map(f)
}

/// A markdown table of B/A ratios for the levels both runs measured (matched by label).
/// Throughput above 1× is better; latency below 1× is better.
pub fn markdown(a: &ServeReport, b: &ServeReport) -> String {
    let mut out = format!(
        "A: `{}` at {} ({})\nB: `{}` at {} ({})\n\n",
        a.model, a.server_url, a.run.timestamp, b.model, b.server_url, b.run.timestamp
    );
    out += "| level | output tok/s A | output tok/s B | B/A | TTFT p50 B/A | TTFT p99 B/A | ITL p50 B/A |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|\n";
    let find = |levels: &[LevelResult], label: &str| -> Option<usize> {
        levels.iter().position(|l| l.label == label)
    };
    for la in &a.levels {
        let Some(lb) = find(&b.levels, &la.label).map(|i| &b.levels[i]) else {
            continue;
        };
        let (ta, tb) = (Some(la.output_throughput), Some(lb.output_throughput));
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            la.label,
            figure(ta),
            figure(tb),
            ratio(ta, tb),
            ratio(p(&la.ttft_ms, |s| s.p50), p(&lb.ttft_ms, |s| s.p50)),
            ratio(p(&la.ttft_ms, |s| s.p99), p(&lb.ttft_ms, |s| s.p99)),
            ratio(p(&la.itl_ms, |s| s.p50), p(&lb.itl_ms, |s| s.p50)),
        );
    }
    let unmatched = |x: &ServeReport, y: &ServeReport| -> Vec<String> {
        x.levels
            .iter()
            .filter(|l| find(&y.levels, &l.label).is_none())
            .map(|l| l.label.clone())
            .collect()
    };
    for (name, labels) in [("A", unmatched(a, b)), ("B", unmatched(b, a))] {
        if !labels.is_empty() {
            out += &format!("\nonly in {name}: {}\n", labels.join(", "));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::openai::Endpoint;
    use crate::report::{tests::ok, ServeParameters};
    use crate::run_info::RunInfo;

    /// A report whose levels have these (label, output tokens/s, per-stream tokens/s).
    pub(crate) fn report_with(levels: &[(&str, f64, f64)]) -> ServeReport {
        let levels = levels
            .iter()
            .map(|&(label, throughput, per_stream)| {
                let records = [ok(0.1, &[0.02, 0.04], 0.2, 10, 3)];
                let mut l = LevelResult::from_records(label.into(), Some(1), None, &records, 1.0);
                l.output_throughput = throughput;
                l.output_throughput_per_stream = Summary::of(&[per_stream]);
                l
            })
            .collect();
        ServeReport {
            kind: SERVE_KIND.into(),
            model: "m".into(),
            server_url: "http://127.0.0.1:1".into(),
            endpoint: Endpoint::Completions,
            parameters: ServeParameters {
                concurrency: vec![1],
                request_rates: vec![],
                duration_s: None,
                requests_per_level: Some(1),
                prompt_tokens: Some(8),
                prompts_file: None,
                max_tokens: 3,
                ignore_eos: false,
                temperature: None,
                warmup_requests: 0,
                seed: 0,
            },
            run: RunInfo::collect(),
            levels,
        }
    }

    #[test]
    fn ratios_level_by_level() {
        let a = report_with(&[("c=1", 50.0, 50.0), ("c=4", 100.0, 25.0)]);
        let mut b = report_with(&[("c=1", 75.0, 75.0), ("c=16", 300.0, 20.0)]);
        b.levels[0].ttft_ms.as_mut().unwrap().p50 *= 0.5;
        let table = markdown(&a, &b);
        let row = table.lines().find(|l| l.starts_with("| c=1 ")).unwrap();
        assert_eq!(
            row,
            "| c=1 | 50.00 | 75.00 | 1.50× | 0.50× | 1.00× | 1.00× |"
        );
        assert!(!table.contains("| c=4 "));
        assert!(table.contains("only in A: c=4") && table.contains("only in B: c=16"));
    }

    #[test]
    fn ratio_against_zero_is_a_dash() {
        assert_eq!(ratio(Some(0.0), Some(3.0)), "–");
        assert_eq!(ratio(None, Some(3.0)), "–");
        assert_eq!(ratio(Some(2.0), Some(3.0)), "1.50×");
    }

    #[test]
    fn reports_round_trip_and_other_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("wick-bench-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        let report = report_with(&[("c=1", 50.0, 50.0)]);
        std::fs::write(&path, serde_json::to_string(&report).unwrap()).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.levels[0].output_throughput, 50.0);
        assert_eq!(back.levels[0].ttft_ms, report.levels[0].ttft_ms);
        std::fs::write(&path, r#"{"parameters":{},"results":[]}"#).unwrap();
        assert!(load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
