//! One Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3) over a packed batch.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::attention::{self, AttentionParams};
use crate::kv_cache::KvStore;
use crate::linear::{host_f32, Linear};
use crate::parallel::{Collective, ShardPlan};
use crate::step::StepInput;
use wick_model::config::ModelConfig;

mod layers;
mod load;

use layers::DecoderLayer;

/// A Llama-family decoder that runs a packed batch over a paged KV cache, whole or as one
/// tensor-parallel rank (see [`crate::parallel`]).
pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    /// What this rank holds; the whole model without tensor parallelism.
    plan: ShardPlan,
    /// Joins the ranks' parts; `None` for a whole model.
    comm: Option<Arc<dyn Collective>>,
    /// `[vocab, hidden]` f32; on a rank, its vocabulary rows plus one zero row that tokens of
    /// other ranks look up.
    embed_tokens: Tensor,
    /// Logit columns each rank contributes to the all-gather: the widest vocabulary part, so
    /// every rank sends the same shape (narrower parts are padded with zeros).
    gather_width: usize,
    /// Where each vocabulary entry lands in the gathered `[rows, world * gather_width]`
    /// logits, when not simply at its own index (uneven parts before the last).
    gather_columns: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    /// Rope tables `[max_position_embeddings, head_dim / 2]`, gathered by position each step.
    rope_cos: Tensor,
    rope_sin: Tensor,
    /// The CPU level wick's kernels (linear layers and attention) run at.
    kernel_level: wick_kernels::Level,
    /// Whether the last layer's o_proj and MLP give a row the same bits in any subset of the
    /// step's rows, so they may run on the logit rows alone.
    narrow_last_layer: bool,
}

/// Where a step's forward pass spent its time, in nanoseconds of the calling thread's wall
/// clock (the linear layers and attention run on the whole pool while it waits); the rest of
/// the pass (embedding, norms, rope, residual adds, the ranks' collectives) is what remains of
/// the step's forward time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepProfile {
    /// Every matrix product: q/k/v, o, gate/up with SiLU, down, lm_head.
    pub linear_ns: u64,
    /// Writing K/V into the cache and attending over it.
    pub attention_ns: u64,
}

/// Up to this many rows, [`LlamaModel::add_norm`] runs on the calling thread.
const NORM_SERIAL_ROWS: usize = 64;

/// Runs `f`, adding its duration to `total`.
fn timed<T>(total: &mut u64, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    *total += start.elapsed().as_nanos() as u64;
    out
}

impl LlamaModel {
    /// For each weight format the linear layers hold, where it computes (`"wick avx512"`,
    /// `"candle"`, ...).
    pub fn kernels(&self) -> std::collections::BTreeMap<String, String> {
        let mut linears = vec![&self.lm_head];
        for l in &self.layers {
            linears.extend(l.qkv.linears());
            linears.extend(l.gate_up.linears());
            linears.extend([&l.o_proj, &l.down_proj]);
        }
        linears
            .into_iter()
            .map(|l| (l.format_name().to_string(), l.kernel()))
            .collect()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one packed step: writes every token's K/V into `cache` and returns the f32 logits of
    /// `step.logit_rows`, `[logit_rows.len(), vocab]`.
    pub fn forward(&self, step: &StepInput, cache: &mut dyn KvStore) -> Result<Tensor> {
        self.forward_profiled(step, cache, &mut StepProfile::default())
    }

    /// As [`LlamaModel::forward`], adding the time spent in the linear layers and in attention
    /// to `profile`.
    pub fn forward_profiled(
        &self,
        step: &StepInput,
        cache: &mut dyn KvStore,
        profile: &mut StepProfile,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n_tokens = step.tokens.len();
        self.validate(step, cache)?;
        if n_tokens == 0 {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &self.device);
        }
        let eps = c.rms_norm_eps as f32;
        let (nh, nkv, hd) = (self.plan.heads.len(), self.plan.kv_heads.len(), c.head_dim);
        let params = AttentionParams {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: cache.block_size(),
            sliding_window: c.sliding_window,
            scale: 1.0 / (hd as f32).sqrt(),
            level: self.kernel_level,
        };

        let positions = Tensor::from_slice(&step.positions, n_tokens, &self.device)?;
        let cos = self.rope_cos.index_select(&positions, 0)?.contiguous()?;
        let sin = self.rope_sin.index_select(&positions, 0)?.contiguous()?;
        // In host memory, the rope tables of the step as slices, for the layers that split
        // their stacked q/k/v and rotate it in one pass.
        let (cos_storage, cos_layout) = cos.storage_and_layout();
        let (sin_storage, sin_layout) = sin.storage_and_layout();
        let host_rope = match (self.device.is_cpu(), cos.dtype()) {
            (true, DType::F32) => Some((
                host_f32(&cos_storage, cos_layout)?,
                host_f32(&sin_storage, sin_layout)?,
            )),
            _ => None,
        };
        let mut x = self.embed(&step.tokens)?;
        let logit_rows = Tensor::from_slice(&step.logit_rows, step.logit_rows.len(), &self.device)?;
        // Whether the last layer goes on with the logit rows alone (see there).
        let narrow = self.narrow_last_layer && step.logit_rows.len() < n_tokens;

        // A layer's input norm, computed with the previous layer's residual add.
        let mut normed: Option<Tensor> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = match normed.take() {
                Some(h) => h,
                None => self.add_norm(&x, None, &layer.input_layernorm, eps)?.1,
            };
            let joined = match (layer.qkv.stacked(), &layer.q_norm, host_rope) {
                (Some((linear, [_, _, _])), None, Some(rope)) => Some((linear, rope)),
                _ => None,
            };
            let attn = if let Some((linear, (cos, sin))) = joined {
                let qkv = timed(&mut profile.linear_ns, || linear.forward(&h))?;
                let qkv = qkv.to_dtype(DType::F32)?.contiguous()?;
                let (qkv_storage, qkv_layout) = qkv.storage_and_layout();
                let qkv = host_f32(&qkv_storage, qkv_layout)?;
                let mut q = vec![0f32; n_tokens * params.q_width()];
                let mut k = vec![0f32; n_tokens * params.kv_width()];
                let mut v = vec![0f32; k.len()];
                attention::split_rope(qkv, cos, sin, &params, &mut q, &mut k, &mut v)?;
                timed(&mut profile.attention_ns, || {
                    self.attend_host(&q, &k, &v, step, &params, cache, l)
                })?
            } else {
                let [q, k, v]: [Tensor; 3] =
                    timed(&mut profile.linear_ns, || layer.qkv.forward(&h))?
                        .try_into()
                        .map_err(|_| candle_core::Error::Msg("q/k/v projections".to_string()))?;
                let q = q.reshape((1, n_tokens, nh, hd))?;
                let k = k.reshape((1, n_tokens, nkv, hd))?;
                let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                    (Some(qn), Some(kn)) => (
                        candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?,
                        candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?,
                    ),
                    _ => (q, k),
                };
                let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &cos, &sin)?;
                let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &cos, &sin)?;
                timed(&mut profile.attention_ns, || {
                    self.attention(&q, &k, &v, step, &params, cache, l)
                })?
            };
            // After the last layer's attention (every row's K/V is in the cache by now), only
            // the rows whose logits are asked for go on: a prompt chunk's other rows would pass
            // through o_proj and the MLP for nothing. The kept rows' values are the same bits
            // either way.
            let attn = if narrow && l + 1 == self.layers.len() {
                if step.logit_rows.is_empty() {
                    break;
                }
                x = x.index_select(&logit_rows, 0)?;
                attn.index_select(&logit_rows, 0)?
            } else {
                attn
            };
            let o = timed(&mut profile.linear_ns, || layer.o_proj.forward(&attn))?;
            let mut o = self.sum_over_ranks(o)?;
            if let Some(b) = &layer.o_bias {
                o = o.broadcast_add(b)?;
            }
            let (sum, h) = self.add_norm(&x, Some(&o), &layer.post_attention_layernorm, eps)?;
            x = sum;

            let down = timed(&mut profile.linear_ns, || layer.mlp(&h, self.kernel_level))?;
            let down = self.sum_over_ranks(down)?;
            match self.layers.get(l + 1) {
                Some(next) => {
                    let (sum, h) = self.add_norm(&x, Some(&down), &next.input_layernorm, eps)?;
                    x = sum;
                    normed = Some(h);
                }
                None => x = (x + down)?,
            }
        }

        if step.logit_rows.is_empty() {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &self.device);
        }
        if !narrow {
            x = x.index_select(&logit_rows, 0)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits =
            timed(&mut profile.linear_ns, || self.lm_head.forward(&x))?.to_dtype(DType::F32)?;
        let Some(comm) = &self.comm else {
            return Ok(logits);
        };
        let (rows, width) = logits.dims2()?;
        let logits = if width < self.gather_width {
            let pad = Tensor::zeros((rows, self.gather_width - width), DType::F32, &self.device)?;
            Tensor::cat(&[&logits, &pad], 1)?
        } else {
            logits
        };
        let gathered = comm.all_gather(&logits)?;
        match &self.gather_columns {
            Some(columns) => gathered.index_select(columns, 1),
            None => gathered.narrow(1, 0, c.vocab_size),
        }
    }

    /// This rank and the number of ranks under tensor parallelism (`(0, 1)` for a whole
    /// model).
    pub fn ranks(&self) -> (usize, usize) {
        self.comm
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world_size()))
    }

    /// Rank 0's `ids` on every rank (a whole model returns them as they are). Every rank passes
    /// the same number of values; the others' are ignored. They travel as f32 through the
    /// logits' all-gather, so each must be below 2^24 (exact in f32).
    pub fn share_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        let Some(comm) = &self.comm else {
            return Ok(ids.to_vec());
        };
        const EXACT: u32 = 1 << 24;
        if let Some(bad) = ids.iter().find(|&&v| v >= EXACT) {
            bail!("shared value {bad} is not exact in f32");
        }
        let n = ids.len();
        let values: Vec<f32> = ids.iter().map(|&v| v as f32).collect();
        let part = Tensor::from_vec(values, (1, n), &self.device)?;
        let gathered = comm.all_gather(&part)?.narrow(1, 0, n)?;
        let values = gathered
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        Ok(values.into_iter().map(|v| v as u32).collect())
    }

    /// Why tensor parallelism stopped working, once it has: the ranks are then out of step for
    /// good and the shard should stop.
    pub fn parallel_failure(&self) -> Option<String> {
        self.comm.as_ref().and_then(|c| c.failure())
    }

    /// This rank's part of the model.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The embeddings of `tokens`, `[tokens, hidden]`. A rank looks up the tokens of its own
    /// vocabulary range (zeros for the others) and the ranks sum their lookups.
    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let vocab = &self.plan.vocab;
        if self.comm.is_none() {
            let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
            return self.embed_tokens.index_select(&ids, 0);
        }
        let zero_row = vocab.len() as u32;
        let local: Vec<u32> = tokens
            .iter()
            .map(|&t| {
                if vocab.contains(&(t as usize)) {
                    t - vocab.start as u32
                } else {
                    zero_row
                }
            })
            .collect();
        let ids = Tensor::from_vec(local, tokens.len(), &self.device)?;
        self.sum_over_ranks(self.embed_tokens.index_select(&ids, 0)?)
    }

    /// The sum of every rank's partial `x` (`x` itself for a whole model).
    fn sum_over_ranks(&self, x: Tensor) -> Result<Tensor> {
        match &self.comm {
            Some(comm) => comm.all_reduce_sum(&x),
            None => Ok(x),
        }
    }

    /// `x + delta` (`x` without `delta`) and its RMS norm with `weight`, `[tokens, hidden]`
    /// each: in one pass over the rows with wick's kernel for f32 tensors in host memory,
    /// with candle's operations otherwise.
    fn add_norm(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let host = self.device.is_cpu()
            && [Some(x), delta, Some(weight)]
                .into_iter()
                .flatten()
                .all(|t| t.dtype() == DType::F32 && t.is_contiguous());
        if !host {
            let sum = match delta {
                Some(d) => (x + d)?,
                None => x.clone(),
            };
            let h = candle_nn::ops::rms_norm(&sum, weight, eps)?;
            return Ok((sum, h));
        }
        let (rows, hidden) = x.dims2()?;
        if delta.is_some_and(|d| d.dims() != x.dims()) || weight.dims() != [hidden] {
            bail!(
                "add_norm: {:?} plus {:?}, weight {:?}",
                x.dims(),
                delta.map(|d| d.dims()),
                weight.dims()
            );
        }
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let delta_guard = delta.map(|d| d.storage_and_layout());
        let xs = host_f32(&x_storage, x_layout)?;
        let ws = host_f32(&w_storage, w_layout)?;
        let ds = match &delta_guard {
            Some((storage, layout)) => Some(host_f32(storage, layout)?),
            None => None,
        };
        let mut sum = vec![0f32; rows * hidden];
        let mut out = vec![0f32; rows * hidden];
        let level = self.kernel_level;
        let norm_row = |(r, (sum, out)): (usize, (&mut [f32], &mut [f32]))| {
            let row = r * hidden..(r + 1) * hidden;
            let d = ds.map(|d| &d[row.clone()]);
            wick_kernels::add_rms_norm(level, &xs[row], d, ws, eps, sum, out);
        };
        // A decode step's rows take microseconds: the pool is woken only for prefill chunks.
        if rows <= NORM_SERIAL_ROWS {
            sum.chunks_mut(hidden)
                .zip(out.chunks_mut(hidden))
                .enumerate()
                .for_each(norm_row);
        } else {
            use rayon::prelude::*;
            sum.par_chunks_mut(hidden)
                .zip(out.par_chunks_mut(hidden))
                .enumerate()
                .with_min_len(16)
                .for_each(norm_row);
        }
        Ok((
            Tensor::from_vec(sum, (rows, hidden), &self.device)?,
            Tensor::from_vec(out, (rows, hidden), &self.device)?,
        ))
    }

    /// Writes the step's K/V into layer `l`'s cache and attends; returns `[tokens, heads * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &StepInput,
        params: &AttentionParams,
        cache: &mut dyn KvStore,
        l: usize,
    ) -> Result<Tensor> {
        // The cache lives in host memory: tensors on another device make one copy each way.
        let host = |t: &Tensor| -> Result<Tensor> {
            if self.device.is_cpu() {
                t.contiguous()
            } else {
                t.to_device(&Device::Cpu)
            }
        };
        let (q, k, v) = (host(q)?, host(k)?, host(v)?);
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        self.attend_host(
            host_f32(&q_storage, q_layout)?,
            host_f32(&k_storage, k_layout)?,
            host_f32(&v_storage, v_layout)?,
            step,
            params,
            cache,
            l,
        )
    }

    /// [`LlamaModel::attention`] from q, k and v in host memory (`[tokens, width]` each).
    #[allow(clippy::too_many_arguments)]
    fn attend_host(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        step: &StepInput,
        params: &AttentionParams,
        cache: &mut dyn KvStore,
        l: usize,
    ) -> Result<Tensor> {
        let n_tokens = step.tokens.len();
        let mut out = vec![0f32; n_tokens * params.q_width()];
        cache.write_and_attend(l, q, k, v, step, params, &mut out)?;
        Tensor::from_vec(out, (n_tokens, params.q_width()), &Device::Cpu)?.to_device(&self.device)
    }

    /// Rejects a step that does not fit this model or cache before anything is written.
    fn validate(&self, step: &StepInput, cache: &dyn KvStore) -> Result<()> {
        let c = &self.config;
        let n = step.tokens.len();
        if step.positions.len() != n {
            bail!("step has {n} tokens and {} positions", step.positions.len());
        }
        cache.check_fits(c.num_hidden_layers, self.plan.kv_heads.len(), c.head_dim)?;
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            bail!("token id {t} is outside the vocabulary of {}", c.vocab_size);
        }
        let max_pos = self.rope_cos.dim(0)?;
        if let Some(&p) = step.positions.iter().find(|&&p| p as usize >= max_pos) {
            bail!("position {p} is past the model's {max_pos} positions");
        }
        if let Some(&r) = step.logit_rows.iter().find(|&&r| r as usize >= n) {
            bail!("logit row {r} is outside the step's {n} tokens");
        }
        attention::validate_step(
            &step.positions,
            &step.seqs,
            cache.num_blocks(),
            cache.block_size(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::load::{gather_layout, inv_freq};
    use super::*;
    use wick_model::config::{Architecture, RopeScaling};

    fn config(rope_scaling: Option<RopeScaling>) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 10,
            hidden_size: 64,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn the_mlp_in_row_chunks_gives_each_row_the_same_bits() {
        use crate::testing::{tiny_vocab_size, tiny_weights, TinyModelSpec};
        use crate::weights::{LoadOptions, Quantize, WeightStore};
        let spec = TinyModelSpec::llama();
        let config = spec.config(tiny_vocab_size());
        let weights = WeightStore::Tensors(tiny_weights(&spec, tiny_vocab_size()));
        let opts = LoadOptions {
            quantize: Some(Quantize::Q8_0),
            ..LoadOptions::default()
        };
        let model = LlamaModel::load(&config, &weights, &opts).unwrap();
        let layer = &model.layers[0];
        let h = Tensor::randn(0f32, 1.0, (150, config.hidden_size), &Device::Cpu).unwrap();
        let level = model.kernel_level;
        let whole = layer.mlp_in_chunks(&h, level, 1024).unwrap();
        let chunked = layer.mlp_in_chunks(&h, level, 64).unwrap();
        assert_eq!(chunked.dims(), whole.dims());
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&chunked), bits(&whole));
    }

    #[test]
    fn gathered_logits_map_back_to_the_vocabulary() {
        let plan = |vocab: usize, world: usize| ShardPlan {
            world_size: world,
            vocab: 0..vocab,
            ..ShardPlan::single(&config(None))
        };
        // 414 over 4: parts of 104, 104, 104 and 102; the first 414 gathered columns are it.
        let (width, columns) = gather_layout(414, &plan(414, 4), &Device::Cpu).unwrap();
        assert_eq!((width, columns.is_none()), (104, true));
        // 5 over 4: parts of 1, 1, 1 and 2, padded to 2 each.
        let (width, columns) = gather_layout(5, &plan(5, 4), &Device::Cpu).unwrap();
        assert_eq!(width, 2);
        assert_eq!(
            columns.unwrap().to_vec1::<u32>().unwrap(),
            vec![0, 2, 4, 6, 7]
        );
    }

    #[test]
    fn linear_rope_scaling_divides_every_frequency() {
        let plain = inv_freq(&config(None));
        let scaled = inv_freq(&config(Some(RopeScaling::Linear { factor: 4.0 })));
        assert_eq!(plain.len(), 8);
        for (p, s) in plain.iter().zip(&scaled) {
            assert!((p / 4.0 - s).abs() <= 1e-7 * p.abs(), "{p} {s}");
        }
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(&config(None));
        let scaled = inv_freq(&config(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        })));
        // Wavelength 2π < 32/4: unchanged; the lowest frequency's wavelength ≫ 32: divided.
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[7] / 8.0 - scaled[7]).abs() <= 1e-7 * plain[7]);
    }
}
