//! wick's scheduler, below the HTTP edge and above the shards: a validated request
//! ([`request`]) goes in through [`infer::Infer`] (admission and health) and its events come
//! back as a stream. Inside:
//! - [`queue`]: waiting requests and the next batch (TGI's admission rules, chunked prefill);
//! - [`block_allocator`], [`radix`]: KV blocks for every request, with a radix prefix cache;
//! - [`batcher`]: the continuous-batching loop (prefill, decode, filter) over
//! - [`client`]: every shard rank at once over gRPC;
//! - [`startup`]: connecting to the shards (Info, warmup, the limits in force);
//! - [`metrics`]: TGI's metric names, shared with the HTTP edge.
//!
//! It compiles and is tested without any HTTP, template or tokenizer code.

pub mod batcher;
pub mod block_allocator;
pub mod client;
pub mod infer;
pub mod metrics;
pub mod queue;
pub mod radix;
pub mod request;
pub mod startup;
