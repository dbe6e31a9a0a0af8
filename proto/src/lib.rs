//! wick's shard protocol (`generate.v1`), generated from `proto/generate.proto`, the naming of
//! shards' unix sockets, and a client constructor for one.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Messages and the `TextGenerationService` client and server.
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("generate.v1");
}

pub use v1::*;

/// Client of one shard.
pub type ShardClient = v1::text_generation_service_client::TextGenerationServiceClient<Channel>;

/// Largest gRPC message either side accepts: `Info` carries the whole tokenizer (several MB).
pub const MAX_MESSAGE_SIZE: usize = 256 << 20;

/// The unix socket of rank `rank` among sockets named after `base`: `{base}-{rank}`. Shards
/// started with `--uds-path base` listen there, and tensor-parallel ranks meet at rendezvous
/// sockets named the same way.
pub fn rank_socket(base: impl AsRef<Path>, rank: usize) -> PathBuf {
    let mut path = base.as_ref().as_os_str().to_owned();
    path.push(format!("-{rank}"));
    PathBuf::from(path)
}

/// Connects to a shard listening on the unix socket `path` (a `unix://` prefix is accepted).
pub async fn connect_uds(path: impl AsRef<Path>) -> Result<ShardClient, tonic::transport::Error> {
    let path: PathBuf = match path
        .as_ref()
        .to_str()
        .and_then(|s| s.strip_prefix("unix://"))
    {
        Some(stripped) => PathBuf::from(stripped),
        None => path.as_ref().to_path_buf(),
    };
    // The URI is required by tonic but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(ShardClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_sockets_append_the_rank() {
        assert_eq!(
            rank_socket("/tmp/wick-x", 3),
            PathBuf::from("/tmp/wick-x-3")
        );
    }
}
