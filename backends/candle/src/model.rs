//! One Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3) over a packed batch.

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::attention::{self, AttentionParams};
use crate::kv_cache::KvCache;
use crate::linear::{host_f32, Linear};
use crate::parallel::{Collective, ShardPlan};
use crate::step::StepInput;
use crate::weights::{LoadOptions, Part, WeightStore};
use wick_model::config::{ModelConfig, RopeScaling};

/// One decoder layer's weights.
struct DecoderLayer {
    input_layernorm: Tensor,
    /// q, k and v projections.
    qkv: Projections,
    o_proj: Linear,
    /// o_proj's bias, added once after the sum over ranks.
    o_bias: Option<Tensor>,
    /// Per-head RMS norm weights on q and k (Qwen3).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attention_layernorm: Tensor,
    /// gate and up projections.
    gate_up: Projections,
    down_proj: Linear,
}

/// The most bytes of gate/up output one MLP pass holds: glibc serves larger blocks with fresh
/// mappings (its mmap threshold cannot be raised past 32 MiB), which are page-faulted and
/// zeroed again in every layer, so a long prefill chunk goes through the MLP in row chunks.
const MLP_CHUNK_BYTES: usize = 16 << 20;

impl DecoderLayer {
    /// `down(SiLU(gate(h)) · up(h))`, over row chunks whose gate/up output stays below
    /// [`MLP_CHUNK_BYTES`] (each row's result is the same whatever the chunk).
    fn mlp(&self, h: &Tensor, level: wick_kernels::Level) -> Result<Tensor> {
        // Whole kernel tiles (64 rows) per chunk.
        let chunk = (MLP_CHUNK_BYTES / (4 * self.gate_up.out_dim().max(1)) / 64 * 64).max(64);
        self.mlp_in_chunks(h, level, chunk)
    }

    fn mlp_in_chunks(
        &self,
        h: &Tensor,
        level: wick_kernels::Level,
        chunk: usize,
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let pass = |x: &Tensor| self.down_proj.forward(&self.gate_up.silu_mul(x, level)?);
        if rows <= chunk {
            return pass(h);
        }
        let parts = (0..rows)
            .step_by(chunk)
            .map(|start| pass(&h.narrow(0, start, chunk.min(rows - start))?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// Linear layers that read the same input: one stacked layer when their weights allow it (the
/// input is then quantized once and read by one pass), else each on its own.
enum Projections {
    Stacked { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let widths = parts.iter().map(Linear::out_dim).collect();
        Ok(match Linear::stack(&parts)? {
            Some(linear) => Projections::Stacked { linear, widths },
            None => Projections::Separate(parts),
        })
    }

    /// Each layer's output `[tokens, out_i]`, in order.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Projections::Stacked { linear, widths } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, start, w)?.contiguous();
                        start += w;
                        part
                    })
                    .collect()
            }
        }
    }

    /// `SiLU(gate) · up` for gate/up projections, in one pass over the stacked output when
    /// they are stacked.
    fn silu_mul(&self, x: &Tensor, level: wick_kernels::Level) -> Result<Tensor> {
        let (linear, width) = match self {
            Projections::Stacked { linear, widths }
                if widths.len() == 2 && widths[0] == widths[1] =>
            {
                (linear, widths[0])
            }
            _ => {
                let [gate, up]: [Tensor; 2] = self
                    .forward(x)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("gate/up projections".to_string()))?;
                return candle_nn::ops::silu(&gate)? * up;
            }
        };
        let y = linear.forward(x)?.contiguous()?;
        let rows = y.dim(0)?;
        let mut out = vec![0f32; rows * width];
        {
            let (storage, layout) = y.storage_and_layout();
            let y = host_f32(&storage, layout)?;
            use rayon::prelude::*;
            out.par_chunks_mut(width)
                .zip(y.par_chunks(2 * width))
                .for_each(|(o, y)| {
                    let (gate, up) = y.split_at(width);
                    wick_kernels::silu_mul(level, gate, up, o);
                });
        }
        Tensor::from_vec(out, (rows, width), x.device())
    }

    /// Output features of all the layers together.
    fn out_dim(&self) -> usize {
        match self {
            Projections::Stacked { widths, .. } => widths.iter().sum(),
            Projections::Separate(parts) => parts.iter().map(Linear::out_dim).sum(),
        }
    }

    fn linears(&self) -> Vec<&Linear> {
        match self {
            Projections::Stacked { linear, .. } => vec![linear],
            Projections::Separate(parts) => parts.iter().collect(),
        }
    }
}

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

/// Runs `f`, adding its duration to `total`.
fn timed<T>(total: &mut u64, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    *total += start.elapsed().as_nanos() as u64;
    out
}

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
            device,
        };
        for (format, kernel) in model.kernels() {
            tracing::info!(format, kernel, "linear layers");
        }
        Ok(model)
    }

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
    pub fn forward(&self, step: &StepInput, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_profiled(step, cache, &mut StepProfile::default())
    }

    /// As [`LlamaModel::forward`], adding the time spent in the linear layers and in attention
    /// to `profile`.
    pub fn forward_profiled(
        &self,
        step: &StepInput,
        cache: &mut KvCache,
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
            block_size: cache.block_size,
            sliding_window: c.sliding_window,
            scale: 1.0 / (hd as f32).sqrt(),
            level: self.kernel_level,
        };

        let positions = Tensor::from_slice(&step.positions, n_tokens, &self.device)?;
        let cos = self.rope_cos.index_select(&positions, 0)?;
        let sin = self.rope_sin.index_select(&positions, 0)?;
        let mut x = self.embed(&step.tokens)?;

        for (layer, (cache_k, cache_v)) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let [q, k, v]: [Tensor; 3] = timed(&mut profile.linear_ns, || layer.qkv.forward(&h))?
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
            let attn = timed(&mut profile.attention_ns, || {
                self.attention(&q, &k, &v, step, &params, cache_k, cache_v)
            })?;
            let o = timed(&mut profile.linear_ns, || layer.o_proj.forward(&attn))?;
            let mut o = self.sum_over_ranks(o)?;
            if let Some(b) = &layer.o_bias {
                o = o.broadcast_add(b)?;
            }
            x = (x + o)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let down = timed(&mut profile.linear_ns, || layer.mlp(&h, self.kernel_level))?;
            x = (x + self.sum_over_ranks(down)?)?;
        }

        if step.logit_rows.is_empty() {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &self.device);
        }
        let rows = Tensor::from_slice(&step.logit_rows, step.logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
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
            attention::write_kv(cache_k, cache_v, k, v, step, params)?;
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
        if step.positions.len() != n {
            bail!("step has {n} tokens and {} positions", step.positions.len());
        }
        if cache.layers.len() != c.num_hidden_layers
            || cache.kv_heads != self.plan.kv_heads.len()
            || cache.head_dim != c.head_dim
        {
            bail!(
                "KV cache ({} layers, {} kv heads of {}) does not fit the model ({} layers, {} kv \
                 heads of {})",
                cache.layers.len(),
                cache.kv_heads,
                cache.head_dim,
                c.num_hidden_layers,
                self.plan.kv_heads.len(),
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
            &step.seqs,
            cache.num_blocks,
            cache.block_size,
        )
    }
}

/// The all-gather width of every rank's logits (its widest vocabulary part) and, when the
/// parts before the last are not all that wide, the gathered column of each vocabulary entry.
fn gather_layout(
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
    use wick_model::config::Architecture;

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
