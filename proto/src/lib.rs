//! wick's shard protocol (`generate.v1`), generated from `proto/generate.proto`.

#![allow(clippy::all)]

/// Messages and the `TextGenerationService` client and server.
pub mod v1 {
    tonic::include_proto!("generate.v1");
}

pub use v1::*;
