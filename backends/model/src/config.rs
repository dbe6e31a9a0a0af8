//! The decoder's hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use serde::{Deserialize, Serialize};

/// The Llama-family variants one decoder implementation covers; they differ in small switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// Llama 2/3 and SmolLM (`LlamaForCausalLM`).
    Llama,
    /// Mistral: sliding-window attention.
    Mistral,
    /// Qwen2 / Qwen2.5: bias on q/k/v projections.
    Qwen2,
    /// Qwen3: RMS norm on q and k per head.
    Qwen3,
}

/// Rope frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// The LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// Per-head RMS norm on q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// Each token attends to at most this many positions (itself included).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config.json and generation_config.json merged).
    pub eos_token_ids: Vec<u32>,
}

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value as Json;

use crate::gguf;

/// Architectures accepted in `config.json`, as (`architectures[0]`, `model_type`) pairs.
const SUPPORTED_HF: &[(&str, &str, Architecture)] = &[
    ("LlamaForCausalLM", "llama", Architecture::Llama),
    ("MistralForCausalLM", "mistral", Architecture::Mistral),
    ("Qwen2ForCausalLM", "qwen2", Architecture::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", Architecture::Qwen3),
];

/// `general.architecture` values accepted in GGUF files.
const SUPPORTED_GGUF: &[(&str, Architecture)] = &[
    ("llama", Architecture::Llama),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
];

fn unsupported_hf(name: &str) -> anyhow::Error {
    let supported: Vec<&str> = SUPPORTED_HF.iter().map(|(a, _, _)| *a).collect();
    anyhow!(
        "unsupported model architecture `{name}` (supported: {})",
        supported.join(", ")
    )
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (and the optional `generation_config.json`, whose EOS
    /// ids are merged with the config's).
    pub fn from_hf(config_json: &Json, generation_config: Option<&Json>) -> Result<Self> {
        let arch_name = config_json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Json::as_str);
        let model_type = config_json.get("model_type").and_then(Json::as_str);
        let architecture = match (arch_name, model_type) {
            (Some(name), _) => SUPPORTED_HF
                .iter()
                .find(|(a, _, _)| *a == name)
                .map(|(_, _, arch)| *arch)
                .ok_or_else(|| unsupported_hf(name))?,
            (None, Some(ty)) => SUPPORTED_HF
                .iter()
                .find(|(_, t, _)| *t == ty)
                .map(|(_, _, arch)| *arch)
                .ok_or_else(|| unsupported_hf(ty))?,
            (None, None) => {
                bail!("config.json names no architecture (`architectures` or `model_type`)")
            }
        };

        let req = |key: &str| -> Result<usize> {
            opt_usize(config_json, key)?.with_context(|| format!("config.json lacks `{key}`"))
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        if num_attention_heads == 0 {
            bail!("config.json: num_attention_heads is 0");
        }
        let num_key_value_heads =
            opt_usize(config_json, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim =
            opt_usize(config_json, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);

        let rope_scaling = match config_json.get("rope_scaling") {
            None | Some(Json::Null) => None,
            Some(v) => parse_hf_rope_scaling(v)?,
        };

        let sliding_window = match architecture {
            Architecture::Llama => None,
            Architecture::Mistral => opt_usize(config_json, "sliding_window")?,
            // Qwen configs always carry a window size; it applies only when switched on.
            Architecture::Qwen2 | Architecture::Qwen3 => {
                let enabled = config_json
                    .get("use_sliding_window")
                    .and_then(Json::as_bool)
                    .unwrap_or(false);
                if enabled {
                    opt_usize(config_json, "sliding_window")?
                } else {
                    None
                }
            }
        };

        let attention_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => config_json
                .get("attention_bias")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        };

        let mut eos_token_ids = token_ids(config_json.get("eos_token_id"))?;
        if let Some(gen) = generation_config {
            for id in token_ids(gen.get("eos_token_id"))? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let bos_token_id = match token_ids(config_json.get("bos_token_id"))?.first() {
            Some(id) => Some(*id),
            None => match generation_config {
                Some(gen) => token_ids(gen.get("bos_token_id"))?.first().copied(),
                None => None,
            },
        };

        Self {
            architecture,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: config_json
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .unwrap_or(1e-6),
            rope_theta: config_json
                .get("rope_theta")
                .and_then(Json::as_f64)
                .unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position_embeddings: req("max_position_embeddings")?,
            tie_word_embeddings: config_json
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            attention_bias,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            bos_token_id,
            eos_token_ids,
        }
        .checked()
    }

    /// Reads the hyper-parameters from a GGUF file's metadata (llama.cpp key names).
    ///
    /// Llama 3 rope scaling is not in the metadata (llama.cpp stores a `rope_freqs` tensor
    /// instead); see [`llama3_scaling_from_freq_factors`].
    pub fn from_gguf(header: &gguf::Header) -> Result<Self> {
        let md = &header.metadata;
        let arch_name = md
            .get("general.architecture")
            .context("GGUF metadata lacks `general.architecture`")?
            .as_str()?
            .to_string();
        let architecture = SUPPORTED_GGUF
            .iter()
            .find(|(a, _)| *a == arch_name)
            .map(|(_, arch)| *arch)
            .ok_or_else(|| {
                let supported: Vec<&str> = SUPPORTED_GGUF.iter().map(|(a, _)| *a).collect();
                anyhow!(
                    "unsupported model architecture `{arch_name}` (supported: {})",
                    supported.join(", ")
                )
            })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let get = |k: &str| md.get(&key(k));
        let req = |k: &str| -> Result<usize> {
            let v = get(k).with_context(|| format!("GGUF metadata lacks `{}`", key(k)))?;
            v.to_usize()
                .with_context(|| format!("GGUF metadata `{}`", key(k)))
        };
        let opt = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.to_usize()
                        .with_context(|| format!("GGUF metadata `{}`", key(k)))
                })
                .transpose()
        };
        let float = |k: &str| -> Result<Option<f64>> {
            get(k)
                .map(|v| {
                    v.to_f64()
                        .with_context(|| format!("GGUF metadata `{}`", key(k)))
                })
                .transpose()
        };

        let hidden_size = req("embedding_length")?;
        let num_attention_heads = req("attention.head_count")?;
        if num_attention_heads == 0 {
            bail!("GGUF metadata: attention.head_count is 0");
        }
        let num_key_value_heads = opt("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let head_dim = opt("attention.key_length")?.unwrap_or(hidden_size / num_attention_heads);

        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(tokens) => tokens.as_array()?.len(),
            None => match opt("vocab_size")? {
                Some(v) => v,
                None => header
                    .tensors
                    .get("token_embd.weight")
                    .and_then(|t| t.dims.get(1))
                    .map(|&rows| rows as usize)
                    .context(
                        "GGUF file has neither `tokenizer.ggml.tokens` nor `token_embd.weight`",
                    )?,
            },
        };

        let rope_scaling = match get("rope.scaling.type").map(|v| v.as_str()).transpose()? {
            None => None,
            Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: float("rope.scaling.factor")?.unwrap_or(1.0) as f32,
            }),
            Some(other) => bail!(
                "unsupported rope scaling `{other}` in GGUF metadata (supported: linear, llama3)"
            ),
        };

        let mut eos_token_ids = Vec::new();
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(v) = md.get(k) {
                let id = v
                    .to_usize()
                    .with_context(|| format!("GGUF metadata `{k}`"))?
                    as u32;
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let bos_token_id = md
            .get("tokenizer.ggml.bos_token_id")
            .map(gguf::Value::to_usize)
            .transpose()?
            .map(|id| id as u32);

        Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            rope_theta: float("rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position_embeddings: req("context_length")?,
            tie_word_embeddings: !header.tensors.contains_key("output.weight"),
            attention_bias: architecture == Architecture::Qwen2
                || header.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window: None,
            bos_token_id,
            eos_token_ids,
        }
        .checked()
    }

    /// Fails on sizes no model has: a corrupt or hostile config must not size the buffers
    /// built from it (rope tables, weights, the KV cache) or overflow their products.
    fn checked(self) -> Result<Self> {
        let sizes = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("num_key_value_heads", self.num_key_value_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, most) in sizes {
            if value == 0 || value > most {
                bail!("config {name} = {value} is out of range (1..={most})");
            }
        }
        if self.sliding_window == Some(0) {
            bail!("config sliding_window must be at least 1");
        }
        Ok(self)
    }
}

impl ModelConfig {
    /// Fails when the model cannot be split over `shards` tensor-parallel ranks: each rank
    /// holds whole attention heads and the query heads that share its KV heads, and a
    /// non-empty part of the MLP features and of the vocabulary.
    pub fn check_split(&self, shards: usize) -> Result<()> {
        if shards == 0 {
            bail!("the number of shards must be at least 1");
        }
        if !self.num_attention_heads.is_multiple_of(shards)
            || !self.num_key_value_heads.is_multiple_of(shards)
        {
            bail!(
                "the model cannot be split over {shards} shards: its {} attention heads and {} \
                 KV heads must both be multiples of the number of shards",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.intermediate_size < shards || self.vocab_size < shards {
            bail!(
                "the model cannot be split over {shards} shards: intermediate size {} and \
                 vocabulary {} must be at least the number of shards",
                self.intermediate_size,
                self.vocab_size
            );
        }
        Ok(())
    }
}

/// Rope scaling from a `config.json` `rope_scaling` object.
fn parse_hf_rope_scaling(v: &Json) -> Result<Option<RopeScaling>> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Json::as_str)
        .context("rope_scaling has no `rope_type`/`type`")?;
    let f = |k: &str| -> Result<f32> {
        v.get(k)
            .and_then(Json::as_f64)
            .map(|x| x as f32)
            .with_context(|| format!("rope_scaling ({kind}) lacks `{k}`"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: f("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: v
                .get("original_max_position_embeddings")
                .and_then(Json::as_u64)
                .context("rope_scaling (llama3) lacks `original_max_position_embeddings`")?
                as usize,
        }),
        other => bail!("unsupported rope scaling `{other}` (supported: llama3, linear)"),
    })
}

/// The rope scale divisor of each frequency (`head_dim / 2` of them) under Llama 3 scaling,
/// as llama.cpp's converter writes them into the `rope_freqs.weight` tensor.
pub fn llama3_freq_factors(scaling: &RopeScaling, head_dim: usize, rope_theta: f32) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = *scaling
    else {
        return vec![1.0; head_dim / 2];
    };
    let old_ctx = original_max_position_embeddings as f32;
    let low_freq_wavelen = old_ctx / low_freq_factor;
    let high_freq_wavelen = old_ctx / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / rope_theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor
            } else {
                let smooth =
                    (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Recovers Llama 3 rope scaling from the per-frequency factors of a GGUF `rope_freqs.weight`
/// tensor: llama.cpp stores the factors, not the parameters, so this tries the parameter
/// sets Llama 3.x models use and returns the one that reproduces the factors.
pub fn llama3_scaling_from_freq_factors(
    factors: &[f32],
    head_dim: usize,
    rope_theta: f32,
) -> Result<RopeScaling> {
    if factors.len() != head_dim / 2 {
        bail!(
            "rope_freqs has {} factors, expected head_dim / 2 = {}",
            factors.len(),
            head_dim / 2
        );
    }
    let factor = factors.iter().copied().fold(1.0f32, f32::max);
    for original_max_position_embeddings in [8192usize, 4096, 2048, 16384, 32768, 131072] {
        for low_freq_factor in [1.0f32, 2.0, 0.5] {
            for high_freq_factor in [4.0f32, 8.0, 2.0, 1.5] {
                if high_freq_factor <= low_freq_factor {
                    continue;
                }
                let candidate = RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                };
                let expected = llama3_freq_factors(&candidate, head_dim, rope_theta);
                let matches = expected
                    .iter()
                    .zip(factors)
                    .all(|(e, f)| (e - f).abs() <= 1e-3 * e.abs().max(1.0));
                if matches {
                    return Ok(candidate);
                }
            }
        }
    }
    bail!("the GGUF rope_freqs tensor matches no Llama 3 rope scaling this server knows")
}

/// A non-negative integer field; `null` reads as absent.
fn opt_usize(v: &Json, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .with_context(|| format!("config.json `{key}` is not a non-negative integer: {x}")),
    }
}

/// A token id field that may be absent, null, an integer or a list of integers.
fn token_ids(v: Option<&Json>) -> Result<Vec<u32>> {
    let one = |x: &Json| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("token id is not a non-negative integer: {x}"))
    };
    match v {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = one(item)?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        }
        Some(x) => Ok(vec![one(x)?]),
    }
}
