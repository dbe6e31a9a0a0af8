//! The paged KV cache: per layer, K and V of shape `[num_blocks, kv_heads, block_size, head_dim]`
//! (head-major inside a block, see [`wick_kernels::PagedKv`]) in the blocks the router chose:
//! position `p` of a sequence is position `p % block_size` of block
//! `block_table[p / block_size]`. Values are f16 by default (half f32's memory and read
//! traffic), or bf16 or f32 (`--kv-cache-dtype`).

use half::{bf16, f16};
use wick_kernels::{KvDtype, KvElement};
use wick_model::config::ModelConfig;

/// One layer's K and V, each `num_blocks * kv_heads * block_size * head_dim` values.
pub struct LayerKv<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: KvElement> LayerKv<T> {
    fn zeroed(n: usize) -> Self {
        Self {
            k: T::zeroed(n),
            v: T::zeroed(n),
        }
    }
}

/// Every layer's K and V in one element type.
pub enum Layers {
    F16(Vec<LayerKv<f16>>),
    Bf16(Vec<LayerKv<bf16>>),
    F32(Vec<LayerKv<f32>>),
}

impl Layers {
    pub fn len(&self) -> usize {
        match self {
            Layers::F16(l) => l.len(),
            Layers::Bf16(l) => l.len(),
            Layers::F32(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every layer's K and V hold `n` values.
    pub fn all_hold(&self, n: usize) -> bool {
        fn check<T>(layers: &[LayerKv<T>], n: usize) -> bool {
            layers.iter().all(|l| l.k.len() == n && l.v.len() == n)
        }
        match self {
            Layers::F16(l) => check(l, n),
            Layers::Bf16(l) => check(l, n),
            Layers::F32(l) => check(l, n),
        }
    }
}

/// K and V of every layer, in blocks of `block_size` token slots. The attention
/// ([`crate::attention`]) writes a step's K/V through each sequence's block table (the router's
/// choice) and reads it back the same way.
pub struct KvCache {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: Layers,
}

impl KvCache {
    /// Bytes one token slot takes over all layers (K and V of `dtype`) with `kv_heads` KV heads
    /// (a tensor-parallel rank holds only its own).
    pub fn bytes_per_slot(config: &ModelConfig, kv_heads: usize, dtype: KvDtype) -> usize {
        config.num_hidden_layers * 2 * kv_heads * config.head_dim * dtype.size()
    }

    /// A zeroed cache of `num_blocks` blocks of `block_size` slots for every layer of `config`,
    /// in the default element type (f16).
    pub fn new(config: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        let kv_heads = config.num_key_value_heads;
        Self::with_dtype(config, kv_heads, num_blocks, block_size, KvDtype::default())
    }

    /// As [`KvCache::new`] for a rank that holds `kv_heads` of the model's KV heads.
    pub fn with_kv_heads(
        config: &ModelConfig,
        kv_heads: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Self {
        Self::with_dtype(config, kv_heads, num_blocks, block_size, KvDtype::default())
    }

    /// As [`KvCache::with_kv_heads`] with values of `dtype`.
    pub fn with_dtype(
        config: &ModelConfig,
        kv_heads: usize,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Self {
        let n = num_blocks * block_size * kv_heads * config.head_dim;
        fn layers<T: KvElement>(count: usize, n: usize) -> Vec<LayerKv<T>> {
            // Zeroed allocations: pages are only touched when written.
            (0..count).map(|_| LayerKv::zeroed(n)).collect()
        }
        let count = config.num_hidden_layers;
        Self {
            num_blocks,
            block_size,
            kv_heads,
            head_dim: config.head_dim,
            layers: match dtype {
                KvDtype::F16 => Layers::F16(layers(count, n)),
                KvDtype::Bf16 => Layers::Bf16(layers(count, n)),
                KvDtype::F32 => Layers::F32(layers(count, n)),
            },
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self.layers {
            Layers::F16(_) => KvDtype::F16,
            Layers::Bf16(_) => KvDtype::Bf16,
            Layers::F32(_) => KvDtype::F32,
        }
    }

    /// Token slots per layer: `num_blocks * block_size`.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}
