//! wick's router: the HTTP edge (TGI's native API and OpenAI's), validation and tokenization,
//! chat templates and Prometheus output, over the scheduler (`wick_scheduler`: the queue with
//! its block allocator and prefix cache, the batching loop that drives the shards over gRPC).

pub mod auth;
pub mod chat_template;
pub mod error;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod types;
pub mod validation;
