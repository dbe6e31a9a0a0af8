//! wick's shard engine on candle.
//!
//! Layers, from the bottom up:
//! - [`config`], [`source`], [`weights`], [`gguf_tokenizer`]: where a model comes from and how its
//!   files become a [`config::ModelConfig`], a [`weights::WeightStore`] and a tokenizer;
//! - [`linear`], [`kv_cache`], [`attention`], [`model`]: one Llama-family decoder that runs a packed
//!   batch (all tokens of all sequences in one activation) over a paged KV cache;
//! - [`sampling`], [`stopping`]: per-request token choice, stop rules and incremental detokenization;
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
pub mod sampling;
pub mod service;
pub mod source;
pub mod stopping;
pub mod testing;
pub mod weights;
