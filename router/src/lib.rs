//! wick's router: the HTTP edge (TGI's native API and OpenAI's), validation, chat templates,
//! the queue with its block allocator and prefix cache, the batching loop that drives the
//! shards over gRPC, and Prometheus metrics.

pub mod auth;
pub mod batcher;
pub mod block_allocator;
pub mod chat_template;
pub mod client;
pub mod error;
pub mod infer;
pub mod metrics;
pub mod queue;
pub mod radix;
pub mod request;
pub mod routes;
pub mod server;
pub mod startup;
pub mod types;
pub mod validation;
