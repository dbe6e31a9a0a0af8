//! The paged KV cache: per layer, K and V of shape `[num_blocks, kv_heads, block_size, head_dim]`
//! (head-major inside a block, see [`wick_kernels::PagedKv`]) in the blocks the router chose:
//! position `p` of a sequence is position `p % block_size` of block
//! `block_table[p / block_size]`. Values are f16 by default (half f32's memory and read
//! traffic), or bf16, f32 or q8_0 (`--kv-cache-dtype`; q8_0 keeps each head's row as blocks
//! of 32 8-bit values with an f16 scale: a quarter of f32's memory).

use candle_core::{bail, Result};
use half::{bf16, f16};
use wick_kernels::{KvBuffer, KvDtype, KvElement, Q8Block};
use wick_model::config::ModelConfig;

use crate::attention::{self, AttentionParams};
use crate::step::StepInput;

/// Where a model keeps its K/V between steps and how it attends over them: the seam between
/// the model code and the memory that holds the cache. The engine, the batching and the
/// protocol see only blocks; a device-resident store (CUDA) implements this trait in place of
/// the CPU cache ([`KvCache`]) without touching them.
pub trait KvStore: Send {
    /// Blocks of [`KvStore::block_size`] token slots; the router allocates them.
    fn num_blocks(&self) -> usize;
    fn block_size(&self) -> usize;
    fn dtype(&self) -> KvDtype;
    /// Why this store cannot hold a model of `layers` layers of `kv_heads` KV heads of
    /// `head_dim`, if it cannot.
    fn check_fits(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<()>;
    /// Writes the K and V rows (`[tokens, kv_heads · head_dim]`) of a checked `step` (see
    /// [`attention::validate_step`]) into layer `layer`, then attends every query token
    /// (`q`: `[tokens, heads · head_dim]`) over its own sequence into `out` (`q`'s shape).
    #[allow(clippy::too_many_arguments)]
    fn write_and_attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        step: &StepInput<'_>,
        params: &AttentionParams,
        out: &mut [f32],
    ) -> Result<()>;
}

/// One layer's K and V, each `num_blocks * kv_heads * block_size * head_dim` values.
struct LayerKv<T: KvElement> {
    k: KvBuffer<T>,
    v: KvBuffer<T>,
}

impl<T: KvElement> LayerKv<T> {
    fn zeroed(n: usize) -> Self {
        Self {
            k: KvBuffer::zeroed(n),
            v: KvBuffer::zeroed(n),
        }
    }
}

/// Every layer's K and V in one element type.
enum Layers {
    F16(Vec<LayerKv<f16>>),
    Bf16(Vec<LayerKv<bf16>>),
    F32(Vec<LayerKv<f32>>),
    Q8_0(Vec<LayerKv<Q8Block>>),
}

/// K and V of every layer, in blocks of `block_size` token slots. The attention
/// ([`crate::attention`]) writes a step's K/V through each sequence's block table (the router's
/// choice) and reads it back the same way.
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    /// Layers, KV heads and head size: every layer's buffers were sized from them.
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: Layers,
}

impl KvCache {
    /// Bytes one token slot takes over all layers (K and V of `dtype`) with `kv_heads` KV heads
    /// (a tensor-parallel rank holds only its own).
    pub fn bytes_per_slot(config: &ModelConfig, kv_heads: usize, dtype: KvDtype) -> usize {
        config.num_hidden_layers * 2 * dtype.bytes(kv_heads * config.head_dim)
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
        fn layers<T: KvElement>(count: usize, values: usize) -> Vec<LayerKv<T>> {
            // Zeroed and faulted in at once (see `KvBuffer::zeroed`).
            (0..count)
                .map(|_| LayerKv::zeroed(values / T::VALUES))
                .collect()
        }
        let count = config.num_hidden_layers;
        Self {
            num_blocks,
            block_size,
            num_layers: count,
            kv_heads,
            head_dim: config.head_dim,
            layers: match dtype {
                KvDtype::F16 => Layers::F16(layers(count, n)),
                KvDtype::Bf16 => Layers::Bf16(layers(count, n)),
                KvDtype::F32 => Layers::F32(layers(count, n)),
                KvDtype::Q8_0 => Layers::Q8_0(layers(count, n)),
            },
        }
    }
}

impl KvStore for KvCache {
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn dtype(&self) -> KvDtype {
        match self.layers {
            Layers::F16(_) => KvDtype::F16,
            Layers::Bf16(_) => KvDtype::Bf16,
            Layers::F32(_) => KvDtype::F32,
            Layers::Q8_0(_) => KvDtype::Q8_0,
        }
    }

    fn check_fits(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<()> {
        if (self.num_layers, self.kv_heads, self.head_dim) != (layers, kv_heads, head_dim) {
            bail!(
                "KV cache ({} layers, {} kv heads of {}) does not fit the model ({layers} \
                 layers, {kv_heads} kv heads of {head_dim})",
                self.num_layers,
                self.kv_heads,
                self.head_dim,
            );
        }
        Ok(())
    }

    fn write_and_attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        step: &StepInput<'_>,
        params: &AttentionParams,
        out: &mut [f32],
    ) -> Result<()> {
        fn run<T: KvElement>(
            layers: &mut [LayerKv<T>],
            layer: usize,
            (q, k, v): (&[f32], &[f32], &[f32]),
            step: &StepInput<'_>,
            params: &AttentionParams,
            out: &mut [f32],
        ) -> Result<()> {
            let Some(l) = layers.get_mut(layer) else {
                bail!("layer {layer} is outside the KV cache's {}", layers.len());
            };
            attention::write_kv(&mut l.k, &mut l.v, k, v, step, params)?;
            attention::paged_attention(q, &l.k, &l.v, &step.positions, &step.seqs, params, out)
        }
        match &mut self.layers {
            Layers::F16(l) => run(l, layer, (q, k, v), step, params, out),
            Layers::Bf16(l) => run(l, layer, (q, k, v), step, params, out),
            Layers::F32(l) => run(l, layer, (q, k, v), step, params, out),
            Layers::Q8_0(l) => run(l, layer, (q, k, v), step, params, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::SeqSpan;
    use crate::testing::TinyModelSpec;

    fn params(c: &ModelConfig, block_size: usize) -> AttentionParams {
        AttentionParams {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_size,
            sliding_window: None,
            scale: 1.0,
            level: wick_kernels::Level::detected(),
        }
    }

    #[test]
    fn every_dtype_stores_and_reads_back_through_the_store() {
        let mut c = TinyModelSpec::default().config(64);
        // Rows of whole Q8_0 blocks.
        c.head_dim = 64;
        let p = params(&c, 4);
        let (kv_width, q_width) = (p.kv_width(), p.q_width());
        // One token at position 0 of block 2: attention over one position returns its V.
        let table = [2u32];
        let step = StepInput {
            tokens: vec![0],
            positions: vec![0],
            seqs: vec![SeqSpan {
                start: 0,
                len: 1,
                context_len: 1,
                block_table: &table,
                prompt: false,
            }],
            logit_rows: vec![0],
        };
        let k: Vec<f32> = (0..kv_width).map(|i| i as f32 * 0.25).collect();
        let v: Vec<f32> = (0..kv_width).map(|i| 1.0 - i as f32 * 0.125).collect();
        let q = vec![0.5f32; q_width];
        for dtype in KvDtype::ALL {
            let mut cache = KvCache::with_dtype(&c, c.num_key_value_heads, 3, 4, dtype);
            let store: &mut dyn KvStore = &mut cache;
            assert_eq!(store.dtype(), dtype);
            assert_eq!((store.num_blocks(), store.block_size()), (3, 4));
            store
                .check_fits(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
                .unwrap();
            let mut out = vec![f32::NAN; q_width];
            store
                .write_and_attend(1, &q, &k, &v, &step, &p, &mut out)
                .unwrap();
            // Each query head reads its KV head's V row as the cache holds it: exactly in the
            // float types (the values are multiples of 1/8 below 2^8), to Q8_0's step in it.
            let held: Vec<f32> = match dtype {
                KvDtype::Q8_0 => {
                    let mut blocks = vec![Q8Block::default(); v.len() / 32];
                    Q8Block::from_f32_slice(&mut blocks, &v);
                    let mut held = vec![0f32; v.len()];
                    Q8Block::to_f32_slice(&mut held, &blocks);
                    // Within half a step of the largest magnitude / 127.
                    let half_step = v.iter().fold(0f32, |m, x| m.max(x.abs())) / 254.0 + 1e-3;
                    assert!(held.iter().zip(&v).all(|(a, b)| (a - b).abs() <= half_step));
                    held
                }
                _ => v.clone(),
            };
            let group = c.num_attention_heads / c.num_key_value_heads;
            for (h, o) in out.chunks_exact(c.head_dim).enumerate() {
                let g = h / group;
                assert_eq!(
                    o,
                    &held[g * c.head_dim..(g + 1) * c.head_dim],
                    "{dtype}, head {h}"
                );
            }
            // A layer the store does not have is an error, not a panic.
            let past = c.num_hidden_layers;
            let err = store
                .write_and_attend(past, &q, &k, &v, &step, &p, &mut out)
                .unwrap_err();
            assert!(err.to_string().contains("outside the KV cache"), "{err}");
            assert_eq!(
                KvCache::bytes_per_slot(&c, c.num_key_value_heads, dtype),
                c.num_hidden_layers * 2 * dtype.bytes(kv_width)
            );
        }
    }

    #[test]
    fn a_store_of_another_shape_does_not_fit() {
        let c = TinyModelSpec::default().config(64);
        let cache = KvCache::new(&c, 2, 4);
        let (layers, heads, hd) = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
        assert!(cache.check_fits(layers, heads, hd).is_ok());
        let err = cache.check_fits(layers + 1, heads, hd).unwrap_err();
        assert!(err.to_string().contains("does not fit the model"), "{err}");
        assert!(cache.check_fits(layers, heads, hd * 2).is_err());
    }
}
