//! One Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3) over a packed batch.

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::attention::{self, AttentionParams};
use crate::config::{ModelConfig, RopeScaling};
use crate::kv_cache::KvCache;
use crate::linear::{host_f32, Linear};
use crate::weights::{LoadOptions, WeightStore};

/// One forward step over a packed batch: every token of every sequence, concatenated.
pub struct StepInput<'a> {
    /// Token ids, `[total_tokens]`.
    pub tokens: Vec<u32>,
    /// Absolute position of each token in its sequence.
    pub positions: Vec<u32>,
    /// KV slot each token's K/V is written to.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqSpan<'a>>,
    /// Packed token indices whose logits are wanted, in output row order.
    pub logit_rows: Vec<u32>,
}

/// One sequence's part of a packed step.
pub struct SeqSpan<'a> {
    /// Offset of its first token in the packed arrays.
    pub start: usize,
    /// Tokens it computes this step.
    pub len: usize,
    /// Tokens in its KV after this step (cached + this step's).
    pub context_len: usize,
    /// Its KV blocks, in order: position `p` lives in block `block_table[p / block_size]`.
    pub block_table: &'a [u32],
}

/// One decoder layer's weights.
struct DecoderLayer {
    input_layernorm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Per-head RMS norm weights on q and k (Qwen3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attention_layernorm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A Llama-family decoder that runs a packed batch over a paged KV cache.
pub struct LlamaModel {
    config: ModelConfig,
    device: Device,
    /// `[vocab, hidden]`, f32.
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    /// Rope tables `[max_position_embeddings, head_dim / 2]`, gathered by position each step.
    rope_cos: Tensor,
    rope_sin: Tensor,
}

impl LlamaModel {
    /// Builds the model from tensors with Hugging Face names.
    pub fn load(config: &ModelConfig, weights: &WeightStore, opts: &LoadOptions) -> Result<Self> {
        let c = config;
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            bail!(
                "{} attention heads cannot share {} kv heads",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            bail!("rope needs an even head_dim, got {}", c.head_dim);
        }
        let device = opts.device.clone();
        let dense = |name: &str| weights.tensor(name, DType::F32, &device);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(dense(&format!("{attn}.q_norm.weight"))?),
                    Some(dense(&format!("{attn}.k_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            // Llama and Qwen3 put a bias on o_proj with `attention_bias`, Qwen2 never does.
            let o_bias = c.attention_bias && weights.contains(&format!("{attn}.o_proj.bias"));
            layers.push(DecoderLayer {
                input_layernorm: dense(&format!("{p}.input_layernorm.weight"))?,
                q_proj: weights.linear(&format!("{attn}.q_proj"), c.attention_bias, opts)?,
                k_proj: weights.linear(&format!("{attn}.k_proj"), c.attention_bias, opts)?,
                v_proj: weights.linear(&format!("{attn}.v_proj"), c.attention_bias, opts)?,
                o_proj: weights.linear(&format!("{attn}.o_proj"), o_bias, opts)?,
                q_norm,
                k_norm,
                post_attention_layernorm: dense(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: weights.linear(&format!("{p}.mlp.gate_proj"), false, opts)?,
                up_proj: weights.linear(&format!("{p}.mlp.up_proj"), false, opts)?,
                down_proj: weights.linear(&format!("{p}.mlp.down_proj"), false, opts)?,
            });
        }
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            weights.linear("model.embed_tokens", false, opts)?
        } else {
            weights.linear("lm_head", false, opts)?
        };
        let (rope_cos, rope_sin) = rope_tables(c, &device)?;
        Ok(Self {
            config: config.clone(),
            embed_tokens: dense("model.embed_tokens.weight")?,
            norm: dense("model.norm.weight")?,
            layers,
            lm_head,
            rope_cos,
            rope_sin,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one packed step: writes every token's K/V into `cache` and returns the f32 logits of
    /// `step.logit_rows`, `[logit_rows.len(), vocab]`.
    pub fn forward(&self, step: &StepInput, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let n_tokens = step.tokens.len();
        self.validate(step, cache)?;
        if n_tokens == 0 {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &self.device);
        }
        let eps = c.rms_norm_eps as f32;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let params = AttentionParams {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: cache.block_size,
            sliding_window: c.sliding_window,
            scale: 1.0 / (hd as f32).sqrt(),
        };

        let ids = Tensor::from_slice(&step.tokens, n_tokens, &self.device)?;
        let positions = Tensor::from_slice(&step.positions, n_tokens, &self.device)?;
        let cos = self.rope_cos.index_select(&positions, 0)?;
        let sin = self.rope_sin.index_select(&positions, 0)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;

        for (layer, (cache_k, cache_v)) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let q = layer.q_proj.forward(&h)?.reshape((1, n_tokens, nh, hd))?;
            let k = layer.k_proj.forward(&h)?.reshape((1, n_tokens, nkv, hd))?;
            let v = layer.v_proj.forward(&h)?;
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (
                    candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?,
                    candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?,
                ),
                _ => (q, k),
            };
            let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &cos, &sin)?;
            let attn = self.attention(&q, &k, &v, step, &params, cache_k, cache_v)?;
            x = (x + layer.o_proj.forward(&attn)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let gate = candle_nn::ops::silu(&layer.gate_proj.forward(&h)?)?;
            let mlp = (gate * layer.up_proj.forward(&h)?)?;
            x = (x + layer.down_proj.forward(&mlp)?)?;
        }

        if step.logit_rows.is_empty() {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &self.device);
        }
        let rows = Tensor::from_slice(&step.logit_rows, step.logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// Writes the step's K/V into one layer's cache and attends; returns `[tokens, heads * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &StepInput,
        params: &AttentionParams,
        cache_k: &mut [f32],
        cache_v: &mut [f32],
    ) -> Result<Tensor> {
        let n_tokens = step.tokens.len();
        // The cache lives in host memory: tensors on another device make one copy each way.
        let host = |t: &Tensor| -> Result<Tensor> {
            if self.device.is_cpu() {
                t.contiguous()
            } else {
                t.to_device(&Device::Cpu)
            }
        };
        let (q, k, v) = (host(q)?, host(k)?, host(v)?);
        let mut out = vec![0f32; n_tokens * params.q_width()];
        {
            let (q_storage, q_layout) = q.storage_and_layout();
            let (k_storage, k_layout) = k.storage_and_layout();
            let (v_storage, v_layout) = v.storage_and_layout();
            let q = host_f32(&q_storage, q_layout)?;
            let k = host_f32(&k_storage, k_layout)?;
            let v = host_f32(&v_storage, v_layout)?;
            attention::write_kv(cache_k, cache_v, k, v, &step.slots, params.kv_width())?;
            attention::paged_attention(
                q,
                cache_k,
                cache_v,
                &step.positions,
                &step.seqs,
                params,
                &mut out,
            )?;
        }
        Tensor::from_vec(out, (n_tokens, params.q_width()), &Device::Cpu)?.to_device(&self.device)
    }

    /// Rejects a step that does not fit this model or cache before anything is written.
    fn validate(&self, step: &StepInput, cache: &KvCache) -> Result<()> {
        let c = &self.config;
        let n = step.tokens.len();
        if step.positions.len() != n || step.slots.len() != n {
            bail!(
                "step has {n} tokens, {} positions and {} slots",
                step.positions.len(),
                step.slots.len()
            );
        }
        if cache.layers.len() != c.num_hidden_layers
            || cache.kv_heads != c.num_key_value_heads
            || cache.head_dim != c.head_dim
        {
            bail!(
                "KV cache ({} layers, {} kv heads of {}) does not fit the model ({} layers, {} kv \
                 heads of {})",
                cache.layers.len(),
                cache.kv_heads,
                cache.head_dim,
                c.num_hidden_layers,
                c.num_key_value_heads,
                c.head_dim
            );
        }
        let cache_floats = cache.num_slots() * cache.kv_heads * cache.head_dim;
        if cache
            .layers
            .iter()
            .any(|(k, v)| k.len() != cache_floats || v.len() != cache_floats)
        {
            bail!(
                "KV cache buffers do not match its {} slots",
                cache.num_slots()
            );
        }
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
            &step.slots,
            &step.seqs,
            cache.num_blocks,
            cache.block_size,
        )
    }
}

/// Rope inverse frequencies for each pair of a head, with the config's scaling applied.
fn inv_freq(c: &ModelConfig) -> Vec<f32> {
    let hd = c.head_dim;
    let base: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| (1.0 / (c.rope_theta as f64).powf(i as f64 / hd as f64)) as f32)
        .collect();
    match &c.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            // Llama 3.x: keep high frequencies, divide low ones by `factor`, blend in between.
            let orig = *original_max_position_embeddings as f32;
            let low_freq_wavelen = orig / low_freq_factor;
            let high_freq_wavelen = orig / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

/// Cos and sin of `position * inv_freq`, `[max_position_embeddings, head_dim / 2]` each.
fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let freqs = inv_freq(c);
    let rows = c.max_position_embeddings.max(1);
    let mut cos = Vec::with_capacity(rows * freqs.len());
    let mut sin = Vec::with_capacity(rows * freqs.len());
    for p in 0..rows {
        for &f in &freqs {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let shape = (rows, freqs.len());
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

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
