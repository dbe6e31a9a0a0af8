//! Figures of a `serve` run: what one request measured, what a load level adds up to, the
//! report written as JSON, and its markdown tables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::openai::Endpoint;
use crate::run_info::RunInfo;
use crate::stats::Summary;

/// Where a request's token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// The OpenAI `usage` object.
    Usage,
    /// llama.cpp's `timings` object.
    Timings,
    /// Not reported by the server: content chunks counted (output) or the asked prompt length
    /// (input).
    Estimated,
}

/// What one request measured. Times are seconds from the moment the request was sent.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// Why the request failed; `None` when it succeeded.
    pub error: Option<String>,
    /// Until the first chunk with text.
    pub ttft_s: Option<f64>,
    /// Gaps between successive chunks with text.
    pub itl_s: Vec<f64>,
    /// Until the last chunk with text (the stream's closing chunks come after it).
    pub last_token_s: Option<f64>,
    /// Until the end of the stream.
    pub e2e_s: f64,
    pub prompt_tokens: u64,
    pub prompt_source: Option<TokenSource>,
    pub completion_tokens: u64,
    pub completion_source: Option<TokenSource>,
}

/// Figures of one load level. Latencies in milliseconds, throughputs in tokens (or requests)
/// per second of the level's wall time. Only successful requests enter the figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelResult {
    /// `c=4` or `rate=2`: how levels of two runs are matched by `compare`.
    pub label: String,
    /// Requests kept in flight (closed loop), or
    pub concurrency: Option<u32>,
    /// Poisson arrivals per second (open loop).
    pub request_rate: Option<f64>,
    /// From the first request sent to the last one finished.
    pub duration_s: f64,
    pub requests_ok: usize,
    pub requests_failed: usize,
    /// Failure messages and how often each occurred.
    pub errors: BTreeMap<String, usize>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Some prompt length was not reported by the server (see [`TokenSource::Estimated`]).
    pub input_tokens_estimated: bool,
    /// Some output length was not reported by the server: content chunks were counted.
    pub output_tokens_estimated: bool,
    pub request_throughput: f64,
    pub input_throughput: f64,
    /// Output tokens of all streams together per second.
    pub output_throughput: f64,
    /// Decode speed one stream sees: (tokens − 1) / (last token − first token), per request.
    pub output_throughput_per_stream: Option<Summary>,
    /// Time to first token.
    pub ttft_ms: Option<Summary>,
    /// Inter-token latency: gaps between chunks with text, all requests pooled.
    pub itl_ms: Option<Summary>,
    /// Time per output token after the first: (last token − first token) / (tokens − 1), per
    /// request.
    pub tpot_ms: Option<Summary>,
    /// End-to-end latency.
    pub e2e_ms: Option<Summary>,
}

impl LevelResult {
    /// Adds up the requests of one level that ran for `duration_s` seconds.
    pub fn from_records(
        label: String,
        concurrency: Option<u32>,
        request_rate: Option<f64>,
        records: &[RequestRecord],
        duration_s: f64,
    ) -> Self {
        let mut errors = BTreeMap::new();
        let (mut ttft, mut itl, mut tpot, mut e2e, mut per_stream) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut input_tokens, mut output_tokens) = (0, 0);
        let (mut input_estimated, mut output_estimated) = (false, false);
        let mut ok = 0;
        for r in records {
            if let Some(e) = &r.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
                continue;
            }
            ok += 1;
            input_tokens += r.prompt_tokens;
            output_tokens += r.completion_tokens;
            input_estimated |= r.prompt_source == Some(TokenSource::Estimated);
            output_estimated |= r.completion_source == Some(TokenSource::Estimated);
            e2e.push(r.e2e_s * 1e3);
            itl.extend(r.itl_s.iter().map(|s| s * 1e3));
            if let (Some(first), Some(last)) = (r.ttft_s, r.last_token_s) {
                ttft.push(first * 1e3);
                let decode_s = last - first;
                if r.completion_tokens > 1 && decode_s > 0.0 {
                    let steps = (r.completion_tokens - 1) as f64;
                    tpot.push(decode_s * 1e3 / steps);
                    per_stream.push(steps / decode_s);
                }
            }
        }
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        Self {
            label,
            concurrency,
            request_rate,
            duration_s,
            requests_ok: ok,
            requests_failed: records.len() - ok,
            errors,
            input_tokens,
            output_tokens,
            input_tokens_estimated: input_estimated,
            output_tokens_estimated: output_estimated,
            request_throughput: per_s(ok as f64),
            input_throughput: per_s(input_tokens as f64),
            output_throughput: per_s(output_tokens as f64),
            output_throughput_per_stream: Summary::of(&per_stream),
            ttft_ms: Summary::of(&ttft),
            itl_ms: Summary::of(&itl),
            tpot_ms: Summary::of(&tpot),
            e2e_ms: Summary::of(&e2e),
        }
    }
}

/// The parameters a run was started with (the API key is never recorded).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeParameters {
    /// Closed-loop levels; empty when the run used request rates.
    pub concurrency: Vec<u32>,
    /// Open-loop levels (requests/s); empty when the run used concurrency.
    pub request_rates: Vec<f64>,
    /// Each level sends requests for this long (in-flight ones are awaited), or
    pub duration_s: Option<f64>,
    /// each level sends this many requests.
    pub requests_per_level: Option<usize>,
    /// Approximate prompt length asked of the built-in corpus; `None` with a prompts file.
    pub prompt_tokens: Option<usize>,
    pub prompts_file: Option<String>,
    pub max_tokens: u32,
    pub ignore_eos: bool,
    pub temperature: Option<f32>,
    pub warmup_requests: usize,
    pub seed: u64,
}

/// Everything `wick-bench serve --json` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeReport {
    /// Always `"serve"`; lets `compare` refuse other files.
    pub kind: String,
    pub model: String,
    pub server_url: String,
    pub endpoint: Endpoint,
    pub parameters: ServeParameters,
    pub run: RunInfo,
    pub levels: Vec<LevelResult>,
}

pub const SERVE_KIND: &str = "serve";

fn opt(s: &Option<Summary>, f: impl Fn(&Summary) -> f64, precision: usize) -> String {
    s.as_ref()
        .map_or_else(|| "–".to_string(), |s| format!("{:.*}", precision, f(s)))
}

/// Throughput table, then latency table, then the errors seen.
pub fn markdown(report: &ServeReport) -> String {
    let p = &report.parameters;
    let prompts = match (&p.prompts_file, p.prompt_tokens) {
        (Some(file), _) => format!("prompts from {file}"),
        (None, Some(tokens)) => format!("~{tokens}-token prompts"),
        (None, None) => String::new(),
    };
    let mut out = format!(
        "model `{}` at {}{}, {prompts}, max {} tokens{}, {} cores here, {}\n\n",
        report.model,
        report.server_url,
        report.endpoint.path(),
        p.max_tokens,
        if p.ignore_eos { " (EOS ignored)" } else { "" },
        report.run.cores,
        report.run.timestamp,
    );
    let (mut in_est, mut out_est) = (false, false);
    out +=
        "| level | ok | failed | req/s | output tok/s | input tok/s | tok/s per stream (avg) |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|\n";
    for l in &report.levels {
        in_est |= l.input_tokens_estimated;
        out_est |= l.output_tokens_estimated;
        let star = |estimated: bool| if estimated { "*" } else { "" };
        out += &format!(
            "| {} | {} | {} | {:.2} | {:.1}{} | {:.1}{} | {}{} |\n",
            l.label,
            l.requests_ok,
            l.requests_failed,
            l.request_throughput,
            l.output_throughput,
            star(l.output_tokens_estimated),
            l.input_throughput,
            star(l.input_tokens_estimated),
            opt(&l.output_throughput_per_stream, |s| s.avg, 1),
            star(l.output_tokens_estimated),
        );
    }
    if out_est {
        out += "\n\\* output tokens estimated: the server reported no usage, content chunks were counted.\n";
    }
    if in_est {
        out += "\n\\* input tokens estimated: the server reported no usage, the asked prompt length was used.\n";
    }
    out += "\n| level | latency (ms) | avg | p50 | p90 | p99 |\n|---|---|---:|---:|---:|---:|\n";
    for l in &report.levels {
        for (name, s) in [
            ("TTFT", &l.ttft_ms),
            ("ITL", &l.itl_ms),
            ("TPOT", &l.tpot_ms),
            ("E2E", &l.e2e_ms),
        ] {
            out += &format!(
                "| {} | {name} | {} | {} | {} | {} |\n",
                l.label,
                opt(s, |s| s.avg, 2),
                opt(s, |s| s.p50, 2),
                opt(s, |s| s.p90, 2),
                opt(s, |s| s.p99, 2),
            );
        }
    }
    let errors: Vec<String> = report
        .levels
        .iter()
        .flat_map(|l| {
            l.errors
                .iter()
                .map(move |(e, n)| format!("- {}: {n} × {e}\n", l.label))
        })
        .collect();
    if !errors.is_empty() {
        out += "\nerrors:\n";
        out += &errors.concat();
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ok(
        ttft: f64,
        itl: &[f64],
        e2e: f64,
        prompt: u64,
        completion: u64,
    ) -> RequestRecord {
        RequestRecord {
            error: None,
            ttft_s: Some(ttft),
            itl_s: itl.to_vec(),
            last_token_s: Some(ttft + itl.iter().sum::<f64>()),
            e2e_s: e2e,
            prompt_tokens: prompt,
            prompt_source: Some(TokenSource::Usage),
            completion_tokens: completion,
            completion_source: Some(TokenSource::Usage),
        }
    }

    fn failed(message: &str) -> RequestRecord {
        RequestRecord {
            error: Some(message.into()),
            e2e_s: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn level_figures_from_known_requests() {
        let records = [
            ok(0.1, &[0.01, 0.03], 0.14, 10, 3),
            ok(0.2, &[0.02, 0.02], 0.24, 30, 3),
            failed("HTTP 503: busy"),
            failed("HTTP 503: busy"),
            failed("stream ended before [DONE]"),
        ];
        let l = LevelResult::from_records("c=2".into(), Some(2), None, &records, 2.0);
        assert_eq!((l.requests_ok, l.requests_failed), (2, 3));
        assert_eq!(l.errors["HTTP 503: busy"], 2);
        assert_eq!(l.errors.len(), 2);
        assert_eq!((l.input_tokens, l.output_tokens), (40, 6));
        assert!(!l.input_tokens_estimated && !l.output_tokens_estimated);
        assert_eq!(l.request_throughput, 1.0);
        assert_eq!(l.input_throughput, 20.0);
        assert_eq!(l.output_throughput, 3.0);
        let ttft = l.ttft_ms.unwrap();
        assert!((ttft.avg - 150.0).abs() < 1e-9 && ttft.count == 2);
        let itl = l.itl_ms.unwrap();
        assert_eq!(itl.count, 4);
        assert!((itl.avg - 20.0).abs() < 1e-9 && (itl.max - 30.0).abs() < 1e-9);
        // Both requests decode 2 tokens after the first in 40 ms: 20 ms each, 50 tokens/s.
        let tpot = l.tpot_ms.unwrap();
        assert!((tpot.avg - 20.0).abs() < 1e-9);
        let per_stream = l.output_throughput_per_stream.unwrap();
        assert!((per_stream.p50 - 50.0).abs() < 1e-9);
        assert!((l.e2e_ms.unwrap().max - 240.0).abs() < 1e-9);
    }

    #[test]
    fn all_failed_level_has_no_latency_figures() {
        let l = LevelResult::from_records("rate=1".into(), None, Some(1.0), &[failed("x")], 1.0);
        assert_eq!((l.requests_ok, l.requests_failed), (0, 1));
        assert!(l.ttft_ms.is_none() && l.itl_ms.is_none() && l.e2e_ms.is_none());
        assert_eq!(l.output_throughput, 0.0);
    }

    #[test]
    fn estimated_counts_are_flagged() {
        let mut r = ok(0.1, &[0.01], 0.11, 5, 2);
        r.completion_source = Some(TokenSource::Estimated);
        let l = LevelResult::from_records("c=1".into(), Some(1), None, &[r], 1.0);
        assert!(l.output_tokens_estimated && !l.input_tokens_estimated);
    }

    #[test]
    fn single_token_requests_have_no_decode_figures() {
        let l =
            LevelResult::from_records("c=1".into(), Some(1), None, &[ok(0.1, &[], 0.1, 5, 1)], 1.0);
        assert!(l.tpot_ms.is_none() && l.output_throughput_per_stream.is_none());
        assert!(l.itl_ms.is_none() && l.ttft_ms.is_some());
    }
}
