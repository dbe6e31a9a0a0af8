//! wick's shard engine on candle.
//!
//! Layers, from the bottom up:
//! - [`source`], [`weights`], [`gguf_tokenizer`]: how a model that `wick_model` resolved (its
//!   files and config) becomes a [`weights::WeightStore`], a tokenizer and a chat template;
//! - [`step`], [`linear`], [`kv_cache`], [`attention`], [`model`]: one Llama-family decoder that runs
//!   a packed batch (all tokens of all sequences in one activation) over a paged KV cache;
//! - [`sampling`], [`stopping`]: per-request token choice, stop rules and incremental detokenization;
//! - [`parallel`]: tensor parallelism: how a model splits over ranks, and their collectives;
//! - [`engine`]: batches keyed by id (prefill, decode, filter, warmup) over plain data types;
//! - [`service`]: the gRPC edge (`generate.v1`), with the engine on its own thread;
//! - [`testing`]: tiny random-weight models (HF folder and GGUF) for tests here and in other crates.

pub mod attention;
pub mod engine;
pub mod gguf_tokenizer;
pub mod kv_cache;
pub mod linear;
pub mod model;
pub mod parallel;
pub mod sampling;
pub mod service;
pub mod source;
pub mod step;
pub mod stopping;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod weights;
