//! The shard's gRPC edge (`generate.v1`): proto ↔ engine conversions, the engine on its own
//! thread, and the server on the unix socket `{uds_path}-{rank}`.
//!
//! Candle compute never runs on a tokio worker: every engine call is a typed `Command` sent
//! over a bounded channel to the engine thread (one tracing span each), answered over a
//! oneshot channel.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use wick_proto::v1 as pb;
use wick_proto::v1::text_generation_service_server::{
    TextGenerationService, TextGenerationServiceServer,
};

use candle_core::DType;
use wick_kernels::KvDtype;

use crate::engine::{Engine, EngineOptions, WarmupLimits};
use crate::kv_cache::KvCache;
use crate::model::LlamaModel;
use crate::parallel::{self, Collective};
use crate::source;
use crate::weights::LoadOptions;

mod convert;
mod engine_thread;

use convert::{cached_batch, new_requests, status, step_response};
use engine_thread::Command;
pub use engine_thread::EngineHandle;

/// Largest gRPC message the shard accepts or sends: `Info` carries the whole tokenizer.
pub const MAX_MESSAGE_SIZE: usize = wick_proto::MAX_MESSAGE_SIZE;

/// Everything a shard needs to start.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// A Hub id, a folder in Hugging Face layout or a `.gguf` file.
    pub model_id: String,
    pub revision: Option<String>,
    /// Socket base path: this shard listens on `{uds_path}-{rank}`.
    pub uds_path: PathBuf,
    pub rank: u32,
    pub world_size: u32,
    /// Where tensor-parallel ranks meet: the base path of their rendezvous unix sockets
    /// (`{master_addr}-{rank}`).
    pub master_addr: PathBuf,
    /// How long a rank waits for the others: at rendezvous, and in each collective operation
    /// (past it, the late rank is reported as hung and the shard stops).
    pub collective_timeout: Duration,
    /// The Hub cache folder (`None` = hf-hub's default).
    pub hub_cache: Option<PathBuf>,
    /// Never reach the Hub; use the cache only.
    pub offline: bool,
    pub load: LoadOptions,
    /// Bytes of KV cache to allocate.
    pub kv_cache_bytes: usize,
    /// The KV cache's element type.
    pub kv_cache_dtype: KvDtype,
    /// Token slots per KV block.
    pub block_size: usize,
}

/// Facts `Info` reports; gathered once when the model loads.
#[derive(Debug, Clone, Default)]
pub struct ShardInfo {
    pub model_id: String,
    pub architecture: String,
    pub dtype: String,
    pub device_type: String,
    /// Weight format of the linear layers ("f32", "f16", "q8_0", ...).
    pub quantize: String,
    pub vocab_size: u32,
    pub max_position_embeddings: u32,
    pub window_size: Option<u32>,
    pub block_size: u32,
    /// KV blocks of `block_size` slots this shard holds (the router allocates them).
    pub num_blocks: u32,
    /// The KV cache's element type, and the bytes one token takes in it over all layers.
    pub kv_cache_dtype: KvDtype,
    pub kv_cache_bytes_per_token: u64,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The tokenizer in `tokenizer.json` form.
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Base path of the sockets (without the `-{rank}` suffix).
    pub uds_path: PathBuf,
    pub rank: u32,
    pub world_size: u32,
    /// Where each weight format computes (see [`LlamaModel::kernels`]).
    pub kernels: std::collections::BTreeMap<String, String>,
}

/// The `generate.v1` service over one engine.
pub struct ShardService {
    engine: EngineHandle,
    info: ShardInfo,
}

impl ShardService {
    pub fn new(engine: EngineHandle, info: ShardInfo) -> Self {
        Self { engine, info }
    }

    /// The tonic server for this service, with message limits large enough for `Info`.
    pub fn into_server(self) -> TextGenerationServiceServer<Self> {
        TextGenerationServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

#[tonic::async_trait]
impl TextGenerationService for ShardService {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let i = &self.info;
        Ok(Response::new(pb::InfoResponse {
            requires_padding: false,
            dtype: i.dtype.clone(),
            device_type: i.device_type.clone(),
            window_size: i.window_size,
            speculate: 0,
            support_chunking: true,
            use_prefix_caching: true,
            attention_impl: "paged".into(),
            block_size: i.block_size,
            num_blocks: i.num_blocks,
            kv_cache_dtype: i.kv_cache_dtype.to_string(),
            kv_cache_bytes_per_token: i.kv_cache_bytes_per_token,
            model_id: i.model_id.clone(),
            architecture: i.architecture.clone(),
            vocab_size: i.vocab_size,
            max_position_embeddings: i.max_position_embeddings,
            eos_token_ids: i.eos_token_ids.clone(),
            bos_token_id: i.bos_token_id,
            tokenizer_json: i.tokenizer_json.clone(),
            chat_template: i.chat_template.clone(),
            bos_token: i.bos_token.clone(),
            eos_token: i.eos_token.clone(),
            quantize: i.quantize.clone(),
            rank: i.rank,
            world_size: i.world_size,
            cpu_model: wick_kernels::cpu_model(),
            cpu_features: wick_kernels::present_cpu_features()
                .into_iter()
                .map(String::from)
                .collect(),
            kernels: i.kernels.clone().into_iter().collect(),
        }))
    }

    async fn service_discovery(
        &self,
        _request: Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        let urls = (0..self.info.world_size)
            .map(|r| {
                format!(
                    "unix://{}",
                    wick_proto::rank_socket(&self.info.uds_path, r as usize).display()
                )
            })
            .collect();
        Ok(Response::new(pb::ServiceDiscoveryResponse { urls }))
    }

    async fn clear_cache(
        &self,
        request: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        let id = request.into_inner().id;
        self.engine
            .call(|reply| Command::Clear { id, reply })
            .await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn filter_batch(
        &self,
        request: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let r = request.into_inner();
        let batch = self
            .engine
            .call(|reply| Command::Filter {
                batch_id: r.batch_id,
                keep: r.request_ids,
                reply,
            })
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::FilterBatchResponse {
            batch: batch.map(cached_batch),
        }))
    }

    async fn warmup(
        &self,
        request: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let r = request.into_inner();
        let batch = r
            .batch
            .ok_or_else(|| Status::invalid_argument("warmup needs a batch"))?;
        let limits = WarmupLimits {
            max_input_tokens: r.max_input_tokens,
            max_prefill_tokens: r.max_prefill_tokens,
            max_total_tokens: r.max_total_tokens,
        };
        let batch_id = batch.id;
        let requests = new_requests(batch).map_err(status)?;
        let info = self
            .engine
            .call(|reply| Command::Warmup {
                batch_id,
                requests,
                limits,
                reply,
            })
            .await?
            .map_err(status)?;
        Ok(Response::new(pb::WarmupResponse {
            max_supported_total_tokens: Some(info.max_supported_total_tokens),
            max_input_tokens: info.max_input_tokens,
            max_total_tokens: info.max_total_tokens,
        }))
    }

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let r = request.into_inner();
        let batch = r
            .batch
            .ok_or_else(|| Status::invalid_argument("prefill needs a batch"))?;
        let cached = r.cached_batch.map(|b| b.id);
        let run_ahead = r.run_ahead;
        let batch_id = batch.id;
        let requests = new_requests(batch).map_err(status)?;
        let out = self
            .engine
            .call(|reply| Command::Prefill {
                batch_id,
                requests,
                cached,
                run_ahead,
                reply,
            })
            .await?
            .map_err(status)?;
        Ok(Response::new(step_response!(pb::PrefillResponse, out)))
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let r = request.into_inner();
        let ids: Vec<u64> = r.batches.iter().map(|b| b.id).collect();
        let out = self
            .engine
            .call(|reply| Command::Decode {
                batch_ids: ids,
                run_ahead: r.run_ahead,
                reply,
            })
            .await?
            .map_err(status)?;
        Ok(Response::new(step_response!(pb::DecodeResponse, out)))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {}))
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Loads the model (this rank's part of it under tensor parallelism, after meeting the other
/// ranks) and builds the engine with a KV cache of `config.kv_cache_bytes`.
pub fn load_engine(config: &ShardConfig) -> anyhow::Result<(Engine, ShardInfo)> {
    let comm: Option<Arc<dyn Collective>> = if config.world_size > 1 {
        Some(parallel::connect(
            &config.master_addr,
            config.rank as usize,
            config.world_size as usize,
            config.collective_timeout,
            &config.load.device,
        )?)
    } else {
        None
    };
    let loaded = source::load(
        &config.model_id,
        config.revision.as_deref(),
        config.hub_cache.clone(),
        config.offline,
        &config.load,
    )?;
    config
        .kv_cache_dtype
        .check_head_dim(loaded.config.head_dim)
        .map_err(anyhow::Error::msg)?;
    let model = match comm {
        Some(comm) => {
            LlamaModel::load_parallel(&loaded.config, &loaded.weights, &config.load, comm)
        }
        None => LlamaModel::load(&loaded.config, &loaded.weights, &config.load),
    }?;
    let c = &loaded.config;
    let plan = model.plan().clone();
    let options = EngineOptions::from_budget(
        c,
        plan.kv_heads.len(),
        config.kv_cache_bytes,
        config.block_size,
        config.kv_cache_dtype,
    );
    let kv_bytes_per_token = KvCache::bytes_per_slot(c, plan.kv_heads.len(), options.kv_dtype);
    // The cache is claimed when it is made: past what the machine has, say so now rather than
    // be killed for it.
    check_kv_fits(
        (options.num_blocks * options.block_size * kv_bytes_per_token) as u64,
        available_memory(),
    )?;
    let info = ShardInfo {
        model_id: loaded.model_id.clone(),
        architecture: format!("{:?}", c.architecture).to_lowercase(),
        dtype: dtype_name(config.load.dtype).into(),
        device_type: if config.load.device.is_cpu() {
            "cpu"
        } else {
            "cuda"
        }
        .into(),
        quantize: loaded.weights.compute_format(&config.load),
        vocab_size: c.vocab_size as u32,
        max_position_embeddings: c.max_position_embeddings as u32,
        window_size: c.sliding_window.map(|w| w as u32),
        block_size: config.block_size as u32,
        num_blocks: u32::try_from(options.num_blocks).unwrap_or(u32::MAX),
        kv_cache_dtype: options.kv_dtype,
        kv_cache_bytes_per_token: kv_bytes_per_token as u64,
        eos_token_ids: c.eos_token_ids.clone(),
        bos_token_id: c.bos_token_id,
        tokenizer_json: loaded
            .tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?,
        chat_template: loaded.chat_template.clone(),
        bos_token: loaded.bos_token.clone(),
        eos_token: loaded.eos_token.clone(),
        uds_path: config.uds_path.clone(),
        rank: config.rank,
        world_size: config.world_size,
        kernels: model.kernels(),
    };
    tracing::info!(
        model_id = %info.model_id,
        architecture = %info.architecture,
        quantize = %info.quantize,
        kv_blocks = options.num_blocks,
        block_size = options.block_size,
        kv_cache_dtype = %options.kv_dtype,
        kv_bytes_per_token,
        rank = plan.rank,
        world_size = plan.world_size,
        heads = ?plan.heads,
        vocab = ?plan.vocab,
        "model loaded"
    );
    let engine = Engine::new(Box::new(model), loaded.config, loaded.tokenizer, options);
    Ok((engine, info))
}

/// The memory Linux says a new allocation can take without swapping (`MemAvailable` in
/// `/proc/meminfo`), in bytes; `None` where it cannot be read.
fn available_memory() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Fails when a KV cache of `kv_bytes` would not fit in `available` bytes.
fn check_kv_fits(kv_bytes: u64, available: Option<u64>) -> anyhow::Result<()> {
    match available {
        Some(available) if kv_bytes > available => anyhow::bail!(
            "the KV cache takes {kv_bytes} bytes (--kv-cache-memory) but only {available} bytes \
             of memory are available after loading the model; lower --kv-cache-memory"
        ),
        _ => Ok(()),
    }
}

/// Loads the model, then serves `generate.v1` on `{uds_path}-{rank}` until `shutdown` resolves,
/// or until the model can no longer run (a tensor-parallel rank died, hung or fell out of step):
/// that ends in an error naming the cause, so whoever supervises the shards stops them all.
pub async fn serve(config: ShardConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.world_size == 0 || config.rank >= config.world_size {
        anyhow::bail!(
            "rank {} is outside world size {}",
            config.rank,
            config.world_size
        );
    }
    if config.block_size == 0 {
        anyhow::bail!("block size must be at least 1");
    }
    // Loading is long and blocking: keep it off the runtime's workers.
    let load_config = config.clone();
    let (engine, info) = tokio::task::spawn_blocking(move || load_engine(&load_config)).await??;
    let (engine, failed) = EngineHandle::spawn(engine)?;
    let path = wick_proto::rank_socket(&config.uds_path, config.rank as usize);
    let failure = std::sync::Mutex::new(None);
    let stop = async {
        tokio::select! {
            _ = shutdown => {}
            Ok(reason) = failed => {
                tracing::error!("stopping: {reason}");
                *failure.lock().expect("not poisoned") = Some(reason);
            }
        }
    };
    serve_on(ShardService::new(engine, info), &path, stop).await?;
    match failure.into_inner().expect("not poisoned") {
        Some(reason) => Err(anyhow::anyhow!("tensor parallelism failed: {reason}")),
        None => Ok(()),
    }
}

/// Serves `service` on the unix socket `path` until `shutdown` resolves; a stale socket file is
/// replaced and the socket file is removed on the way out.
pub async fn serve_on(
    service: ShardService,
    path: &Path,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::warn!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot remove {}: {e}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
    tracing::info!(socket = %path.display(), "shard ready");
    let result = tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    let _ = std::fs::remove_file(path);
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kv_cache_larger_than_the_available_memory_is_refused_at_load() {
        let meminfo = "MemTotal:       24683700 kB\nMemFree:        20264244 kB\n\
                       MemAvailable:   23998888 kB\nBuffers:           12345 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(23_998_888 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots\n"), None);

        let available = Some(8 << 30);
        assert!(check_kv_fits(2 << 30, available).is_ok());
        assert!(check_kv_fits(8 << 30, available).is_ok());
        let err = check_kv_fits((8 << 30) + 1, available)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lower --kv-cache-memory"), "{err}");
        assert!(err.contains(&(8u64 << 30).to_string()), "{err}");
        // Where the memory cannot be read, nothing is refused.
        assert!(check_kv_fits(u64::MAX, None).is_ok());
        // This machine's own figure reads.
        #[cfg(target_os = "linux")]
        assert!(available_memory().is_some_and(|b| b > 0));
    }
}
