//! Tensor parallelism: how one model is split over `world_size` ranks, and the collectives that
//! join the parts.
//!
//! Each rank holds a contiguous range of the attention heads (q/k/v rows, o_proj columns), of
//! the MLP's intermediate features (gate/up rows, down_proj columns) and of the vocabulary
//! (embedding and lm_head rows). A step then needs four kinds of exchange: an all-reduce (sum)
//! after the embedding lookup, after each o_proj and after each down_proj, an all-gather of the
//! logits, and rank 0's sampled tokens sent to the others (through the same all-gather): only
//! rank 0 samples, detokenizes and checks stop rules (its answer is the one the router reads);
//! the other ranks take its tokens, so they stay in lock-step without that work.

use std::ops::Range;

use candle_core::{bail, Result, Tensor};

use wick_model::config::ModelConfig;

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod socket;

#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;
pub use socket::SocketCollective;

/// The collectives tensor parallelism needs. Every rank calls the same operations in the same
/// order with tensors of the same shape (all-gather parts may differ in their last dimension).
///
/// An implementation that fails (a rank died, hung or fell out of step) stays failed: later
/// calls fail at once and [`Collective::failure`] says why, so the shard can stop.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Element-wise sum of `x` over all ranks. Every rank gets the same values bit for bit (the
    /// sum runs in rank order everywhere).
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;

    /// Every rank's `x: [rows, cols]`, concatenated along the last dimension in rank order:
    /// `[rows, world_size * cols]`. Every rank passes the same shape (NCCL's contract; the
    /// socket collective also accepts parts of different widths).
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Why this collective can no longer be used, once an operation has failed.
    fn failure(&self) -> Option<String>;
}

/// Joins the `world_size` ranks that meet at `rendezvous` (see [`SocketCollective::connect`]):
/// over NCCL when the model runs on a CUDA device and wick was built with the `nccl` feature,
/// else over the socket mesh itself.
pub fn connect(
    rendezvous: &std::path::Path,
    rank: usize,
    world_size: usize,
    timeout: std::time::Duration,
    device: &candle_core::Device,
) -> anyhow::Result<std::sync::Arc<dyn Collective>> {
    let mesh = SocketCollective::connect(rendezvous, rank, world_size, timeout)?;
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(std::sync::Arc::new(NcclCollective::connect(&mesh, device)?));
    }
    let _ = device;
    Ok(std::sync::Arc::new(mesh))
}

/// The part of `0..total` rank `rank` of `world_size` holds: chunks of `ceil(total / world)`
/// rounded up to a multiple of `align` when every rank still gets a non-empty part that way
/// (quantized weights split by columns then keep whole blocks), else as even as possible.
pub fn split_range(total: usize, rank: usize, world_size: usize, align: usize) -> Range<usize> {
    let world = world_size.max(1);
    let align = align.max(1);
    let chunk = total.div_ceil(world).div_ceil(align) * align;
    if chunk * (world - 1) < total {
        let start = (chunk * rank).min(total);
        return start..(start + chunk).min(total);
    }
    total * rank / world..total * (rank + 1) / world
}

/// Quantized weights split by columns keep whole blocks when a split falls on a multiple of
/// this (every ggml block size divides 256).
pub const SPLIT_ALIGN: usize = 256;

/// What one rank holds of a model: ranges of heads, KV heads, MLP features and vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub rank: usize,
    pub world_size: usize,
    /// Attention (query) heads.
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// MLP intermediate features.
    pub mlp: Range<usize>,
    /// Vocabulary rows of the embedding and the lm_head.
    pub vocab: Range<usize>,
}

impl ShardPlan {
    /// The whole model on one rank.
    pub fn single(config: &ModelConfig) -> Self {
        Self {
            rank: 0,
            world_size: 1,
            heads: 0..config.num_attention_heads,
            kv_heads: 0..config.num_key_value_heads,
            mlp: 0..config.intermediate_size,
            vocab: 0..config.vocab_size,
        }
    }

    /// Rank `rank`'s part; fails when the heads or KV heads do not divide by `world_size`
    /// (each rank must hold whole heads and the query heads that share its KV heads).
    pub fn new(config: &ModelConfig, rank: usize, world_size: usize) -> Result<Self> {
        let c = config;
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is outside world size {world_size}");
        }
        c.check_split(world_size)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let per = |n: usize| n / world_size * rank..n / world_size * (rank + 1);
        Ok(Self {
            rank,
            world_size,
            heads: per(c.num_attention_heads),
            kv_heads: per(c.num_key_value_heads),
            mlp: split_range(c.intermediate_size, rank, world_size, SPLIT_ALIGN),
            vocab: split_range(c.vocab_size, rank, world_size, 1),
        })
    }

    pub fn is_split(&self) -> bool {
        self.world_size > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cover(total: usize, world: usize, align: usize) -> Vec<Range<usize>> {
        (0..world)
            .map(|r| split_range(total, r, world, align))
            .collect()
    }

    #[test]
    fn splits_cover_everything_once() {
        for total in [1usize, 7, 96, 1536, 49152, 11008] {
            for world in 1..=8 {
                for align in [1, 32, 256] {
                    if total < world {
                        continue;
                    }
                    let parts = cover(total, world, align);
                    assert_eq!(parts[0].start, 0);
                    for w in parts.windows(2) {
                        assert_eq!(w[0].end, w[1].start, "{total} {world} {align}");
                    }
                    assert_eq!(parts.last().unwrap().end, total);
                    assert!(
                        parts.iter().all(|p| !p.is_empty()),
                        "{total} {world} {align}"
                    );
                }
            }
        }
    }

    #[test]
    fn aligned_when_possible() {
        assert_eq!(cover(1536, 3, 256), vec![0..512, 512..1024, 1024..1536]);
        // 11008 / 3 = 3669.3: 3840-feature chunks keep 256-element blocks whole.
        assert_eq!(cover(11008, 3, 256), vec![0..3840, 3840..7680, 7680..11008]);
        // Alignment that would leave a rank empty is dropped.
        assert_eq!(cover(300, 3, 256), vec![0..100, 100..200, 200..300]);
    }
}
