//! The paged KV cache: per layer, K and V of shape `[num_blocks, block_size, kv_heads, head_dim]`,
//! in the blocks the router chose: position `p` of a sequence is slot
//! `block_table[p / block_size] * block_size + p % block_size`.

use wick_model::config::ModelConfig;

/// K and V of every layer, in blocks of `block_size` token slots. The attention
/// ([`crate::attention`]) writes a step's K/V through each sequence's block table (the router's
/// choice) and reads it back the same way.
pub struct KvCache {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// One (K, V) pair per layer, each `num_blocks * block_size * kv_heads * head_dim` f32.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    /// Bytes one token slot takes over all layers (K and V, f32) with `kv_heads` KV heads
    /// (a tensor-parallel rank holds only its own).
    pub fn bytes_per_slot(config: &ModelConfig, kv_heads: usize) -> usize {
        config.num_hidden_layers * 2 * kv_heads * config.head_dim * 4
    }

    /// A zeroed cache of `num_blocks` blocks of `block_size` slots for every layer of `config`.
    pub fn new(config: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        Self::with_kv_heads(config, config.num_key_value_heads, num_blocks, block_size)
    }

    /// As [`KvCache::new`] for a rank that holds `kv_heads` of the model's KV heads.
    pub fn with_kv_heads(
        config: &ModelConfig,
        kv_heads: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Self {
        let n = num_blocks * block_size * kv_heads * config.head_dim;
        Self {
            num_blocks,
            block_size,
            kv_heads,
            head_dim: config.head_dim,
            // Zeroed allocations come from calloc: pages are only touched when written.
            layers: (0..config.num_hidden_layers)
                .map(|_| (vec![0f32; n], vec![0f32; n]))
                .collect(),
        }
    }

    /// Token slots per layer: `num_blocks * block_size`.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}
