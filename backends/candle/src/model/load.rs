//! Building a [`LlamaModel`] from a weight store, whole or as one tensor-parallel rank: layers,
//! vocabulary parts and the logits' gather layout, rope tables.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};
use wick_model::config::{ModelConfig, RopeScaling};

use super::layers::{DecoderLayer, Projections};
use super::LlamaModel;
use crate::parallel::{Collective, ShardPlan};
use crate::weights::{LoadOptions, Part, WeightStore};

impl LlamaModel {
    /// Builds the whole model from tensors with Hugging Face names.
    pub fn load(config: &ModelConfig, weights: &WeightStore, opts: &LoadOptions) -> Result<Self> {
        Self::load_part(config, weights, opts, ShardPlan::single(config), None)
    }

    /// Builds this rank's part of the model; `comm` joins it with the other ranks' parts.
    /// Fails when the model cannot be split over `comm.world_size()` ranks.
    pub fn load_parallel(
        config: &ModelConfig,
        weights: &WeightStore,
        opts: &LoadOptions,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        let plan = ShardPlan::new(config, comm.rank(), comm.world_size())?;
        let comm = plan.is_split().then_some(comm);
        Self::load_part(config, weights, opts, plan, comm)
    }

    fn load_part(
        config: &ModelConfig,
        weights: &WeightStore,
        opts: &LoadOptions,
        plan: ShardPlan,
        comm: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
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
        // Rows of q (and k/v) are whole heads; o_proj's columns follow q's rows; gate/up rows
        // and down_proj's columns are the rank's MLP features.
        let whole_or = |part: Part| if plan.is_split() { part } else { Part::Whole };
        let hd = c.head_dim;
        let q_rows = whole_or(Part::Rows(plan.heads.start * hd..plan.heads.end * hd));
        let kv_rows = whole_or(Part::Rows(plan.kv_heads.start * hd..plan.kv_heads.end * hd));
        let o_cols = whole_or(Part::Cols(plan.heads.start * hd..plan.heads.end * hd));
        let mlp_rows = whole_or(Part::Rows(plan.mlp.clone()));
        let mlp_cols = whole_or(Part::Cols(plan.mlp.clone()));
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
            let o_bias = if c.attention_bias && weights.contains(&format!("{attn}.o_proj.bias")) {
                Some(dense(&format!("{attn}.o_proj.bias"))?)
            } else {
                None
            };
            let qkv = |name: &str, part: &Part| {
                weights.linear_part(&format!("{attn}.{name}"), c.attention_bias, part, opts)
            };
            let mlp = |name: &str, part: &Part| {
                weights.linear_part(&format!("{p}.mlp.{name}"), false, part, opts)
            };
            layers.push(DecoderLayer {
                input_layernorm: dense(&format!("{p}.input_layernorm.weight"))?,
                qkv: Projections::new(vec![
                    qkv("q_proj", &q_rows)?,
                    qkv("k_proj", &kv_rows)?,
                    qkv("v_proj", &kv_rows)?,
                ])?,
                o_proj: weights.linear_part(&format!("{attn}.o_proj"), false, &o_cols, opts)?,
                o_bias,
                q_norm,
                k_norm,
                post_attention_layernorm: dense(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_up: Projections::new(vec![
                    mlp("gate_proj", &mlp_rows)?,
                    mlp("up_proj", &mlp_rows)?,
                ])?,
                down_proj: mlp("down_proj", &mlp_cols)?,
            });
        }
        let vocab_rows = whole_or(Part::Rows(plan.vocab.clone()));
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            weights.linear_part("model.embed_tokens", false, &vocab_rows, opts)?
        } else {
            weights.linear_part("lm_head", false, &vocab_rows, opts)?
        };
        let mut embed_tokens = weights.tensor_part(
            "model.embed_tokens.weight",
            &vocab_rows,
            DType::F32,
            &device,
        )?;
        if plan.is_split() {
            let zero = Tensor::zeros((1, c.hidden_size), DType::F32, &device)?;
            embed_tokens = Tensor::cat(&[&embed_tokens, &zero], 0)?;
        }
        let (gather_width, gather_columns) = gather_layout(c.vocab_size, &plan, &device)?;
        let (rope_cos, rope_sin) = rope_tables(c, &device)?;
        let narrow_last_layer = layers.last().is_some_and(|l| l.tail_rows_independent());
        let model = Self {
            config: config.clone(),
            plan,
            comm,
            embed_tokens,
            gather_width,
            gather_columns,
            norm: dense("model.norm.weight")?,
            layers,
            lm_head,
            rope_cos,
            rope_sin,
            kernel_level: opts.kernel_level,
            narrow_last_layer,
            device,
        };
        for (format, kernel) in model.kernels() {
            tracing::info!(format, kernel, "linear layers");
        }
        Ok(model)
    }
}

/// The all-gather width of every rank's logits (its widest vocabulary part) and, when the
/// parts before the last are not all that wide, the gathered column of each vocabulary entry.
pub(super) fn gather_layout(
    vocab: usize,
    plan: &ShardPlan,
    device: &Device,
) -> Result<(usize, Option<Tensor>)> {
    let parts: Vec<std::ops::Range<usize>> = (0..plan.world_size)
        .map(|r| crate::parallel::split_range(vocab, r, plan.world_size, 1))
        .collect();
    let width = parts.iter().map(|p| p.len()).max().unwrap_or(0);
    let packed = parts[..parts.len() - 1].iter().all(|p| p.len() == width);
    if packed {
        return Ok((width, None));
    }
    let columns: Vec<u32> = parts
        .iter()
        .enumerate()
        .flat_map(|(r, p)| (0..p.len()).map(move |i| (r * width + i) as u32))
        .collect();
    let n = columns.len();
    Ok((width, Some(Tensor::from_vec(columns, n, device)?)))
}

/// Rope inverse frequencies for each pair of a head, with the config's scaling applied.
pub(super) fn inv_freq(c: &ModelConfig) -> Vec<f32> {
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
pub(super) fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
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
