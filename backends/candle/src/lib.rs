//! wick's shard engine on candle.
//!
//! Layers, from the bottom up:
//! - [`config`], [`source`], [`weights`], [`gguf_tokenizer`]: where a model comes from and how its
//!   files become a [`config::ModelConfig`], a [`weights::WeightStore`] and a tokenizer;
//! - [`linear`], [`kv_cache`], [`attention`], [`model`]: one Llama-family decoder that runs a packed
//!   batch (all tokens of all sequences in one activation) over a paged KV cache;
//! - [`sampling`], [`stopping`]: per-request token choice, stop rules and incremental detokenization;
//! - [`parallel`]: tensor parallelism: how a model splits over ranks, and their collectives;
//! - [`engine`]: batches keyed by id (prefill, decode, filter, warmup) over plain data types;
//! - [`service`]: the gRPC edge (`generate.v1`), with the engine on its own thread;
//! - [`testing`]: tiny random-weight models (HF folder and GGUF) for tests here and in other crates.

pub mod attention;
pub mod config;
pub mod engine;
pub mod gguf_tokenizer;
pub mod kv_cache;
pub mod linear;
pub mod model;
pub mod parallel;
pub mod sampling;
pub mod service;
pub mod source;
pub mod stopping;
pub mod testing;
pub mod weights;

/// Parses a byte size: a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 2GiB or 512MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    Ok((number * scale as f64) as u64)
}
