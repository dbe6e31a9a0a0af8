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
