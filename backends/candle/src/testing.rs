//! Tiny random-weight models with a real tokenizer, for tests here and in other crates.
//!
//! Everything is deterministic (weights come from a seeded PRNG keyed by tensor name) and small
//! enough that a forward pass takes milliseconds. A model can be written as a Hugging Face folder
//! ([`write_hf_model`], [`write_hf_model_with`]) or as a llama GGUF file ([`write_gguf_model`]),
//! or used in memory ([`tiny_weights`], [`TinyModelSpec::config`]).

mod gguf;
mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use wick_model::config::{Architecture, ModelConfig, RopeScaling};

pub use gguf::write_gguf_model;
pub use tokenizer::{tiny_tokenizer, ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS};

/// ChatML, as SmolLM2 and Qwen use it.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Id of `<|endoftext|>` in [`tiny_tokenizer`].
pub const ENDOFTEXT_ID: u32 = 0;
/// Id of `<|im_start|>` in [`tiny_tokenizer`] (also the models' BOS, as in SmolLM2).
pub const IM_START_ID: u32 = 1;
/// Id of `<|im_end|>` in [`tiny_tokenizer`] (the models' EOS).
pub const IM_END_ID: u32 = 2;

/// RMS-norm epsilon of every tiny model.
pub const RMS_NORM_EPS: f64 = 1e-5;

/// The shape of a tiny model. Build one with a per-family constructor and adjust fields:
/// `TinyModelSpec { num_hidden_layers: 3, ..TinyModelSpec::qwen2() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelSpec {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<RopeScaling>,
    pub sliding_window: Option<usize>,
    /// Seeds the weights: two specs that differ only here have different weights.
    pub seed: u64,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            tie_word_embeddings: false,
            rope_scaling: None,
            sliding_window: None,
            seed: 0,
            max_position_embeddings: 2048,
            rope_theta: 10_000.0,
        }
    }
}

impl TinyModelSpec {
    /// Llama 2 / SmolLM shape: GQA (4 heads, 2 KV heads), untied head.
    pub fn llama() -> Self {
        Self::default()
    }

    /// Mistral: sliding-window attention over 8 positions, so short tests cross the window.
    pub fn mistral() -> Self {
        Self {
            architecture: Architecture::Mistral,
            sliding_window: Some(8),
            ..Self::default()
        }
    }

    /// Qwen2: bias on q/k/v, tied embeddings.
    pub fn qwen2() -> Self {
        Self {
            architecture: Architecture::Qwen2,
            tie_word_embeddings: true,
            rope_theta: 1_000_000.0,
            ..Self::default()
        }
    }

    /// Qwen3: per-head q/k RMS norm and a head_dim (32) that is not hidden / heads (16).
    pub fn qwen3() -> Self {
        Self {
            architecture: Architecture::Qwen3,
            head_dim: 32,
            tie_word_embeddings: true,
            rope_theta: 1_000_000.0,
            ..Self::default()
        }
    }

    /// Llama 3 rope scaling, with a short original context so that, at head_dim 16 and theta
    /// 500000, the frequencies fall in all three bands (kept, smoothed, divided by `factor`).
    pub fn llama3() -> Self {
        Self {
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
            rope_theta: 500_000.0,
            ..Self::default()
        }
    }

    /// The decoder configuration a loader should derive from this spec's files.
    pub fn config(&self, vocab_size: usize) -> ModelConfig {
        ModelConfig {
            architecture: self.architecture,
            vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rms_norm_eps: RMS_NORM_EPS,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.architecture == Architecture::Qwen2,
            qk_norm: self.architecture == Architecture::Qwen3,
            sliding_window: self.sliding_window,
            bos_token_id: Some(IM_START_ID),
            eos_token_ids: vec![IM_END_ID, ENDOFTEXT_ID],
        }
    }
}

/// The vocabulary size of [`tiny_tokenizer`] (and so of every tiny model's embedding).
pub fn tiny_vocab_size() -> usize {
    tokenizer::tiny_vocab().tokens.len()
}

/// SplitMix64: small, fast and good enough to make weights that look random.
struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream per (seed, tensor name), so a tensor's values do not depend on which other
    /// tensors exist or in which order they are made.
    fn for_tensor(seed: u64, name: &str) -> Self {
        // FNV-1a of the name.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ hash)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_signed(&mut self) -> f32 {
        // 24 random bits: exactly representable in f32.
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// `center + scale * U(-1, 1)` for every element.
fn random_tensor(seed: u64, name: &str, shape: &[usize], center: f32, scale: f32) -> Tensor {
    let mut rng = SplitMix64::for_tensor(seed, name);
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| center + scale * rng.next_signed())
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape matches the element count")
}

/// The model's f32 weights under Hugging Face names. Linear weights are U(±2/sqrt(in_dim)), so
/// each layer roughly keeps the scale of its input; norm weights are 1 ± 0.1; biases ± 0.1.
pub fn tiny_weights(spec: &TinyModelSpec, vocab_size: usize) -> HashMap<String, Tensor> {
    let seed = spec.seed;
    let hidden = spec.hidden_size;
    let q_dim = spec.num_attention_heads * spec.head_dim;
    let kv_dim = spec.num_key_value_heads * spec.head_dim;
    let mut weights = HashMap::new();
    let mut linear = |name: String, out_dim: usize, in_dim: usize| {
        let scale = 2.0 / (in_dim as f32).sqrt();
        let tensor = random_tensor(seed, &name, &[out_dim, in_dim], 0.0, scale);
        weights.insert(name, tensor);
    };
    linear("model.embed_tokens.weight".into(), vocab_size, hidden);
    if !spec.tie_word_embeddings {
        linear("lm_head.weight".into(), vocab_size, hidden);
    }
    for i in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{i}");
        linear(format!("{p}.self_attn.q_proj.weight"), q_dim, hidden);
        linear(format!("{p}.self_attn.k_proj.weight"), kv_dim, hidden);
        linear(format!("{p}.self_attn.v_proj.weight"), kv_dim, hidden);
        linear(format!("{p}.self_attn.o_proj.weight"), hidden, q_dim);
        linear(
            format!("{p}.mlp.gate_proj.weight"),
            spec.intermediate_size,
            hidden,
        );
        linear(
            format!("{p}.mlp.up_proj.weight"),
            spec.intermediate_size,
            hidden,
        );
        linear(
            format!("{p}.mlp.down_proj.weight"),
            hidden,
            spec.intermediate_size,
        );
    }
    let mut vector = |name: String, len: usize, center: f32, scale: f32| {
        let tensor = random_tensor(seed, &name, &[len], center, scale);
        weights.insert(name, tensor);
    };
    vector("model.norm.weight".into(), hidden, 1.0, 0.1);
    for i in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{i}");
        vector(format!("{p}.input_layernorm.weight"), hidden, 1.0, 0.1);
        vector(
            format!("{p}.post_attention_layernorm.weight"),
            hidden,
            1.0,
            0.1,
        );
        if spec.architecture == Architecture::Qwen2 {
            vector(format!("{p}.self_attn.q_proj.bias"), q_dim, 0.0, 0.1);
            vector(format!("{p}.self_attn.k_proj.bias"), kv_dim, 0.0, 0.1);
            vector(format!("{p}.self_attn.v_proj.bias"), kv_dim, 0.0, 0.1);
        }
        if spec.architecture == Architecture::Qwen3 {
            vector(
                format!("{p}.self_attn.q_norm.weight"),
                spec.head_dim,
                1.0,
                0.1,
            );
            vector(
                format!("{p}.self_attn.k_norm.weight"),
                spec.head_dim,
                1.0,
                0.1,
            );
        }
    }
    weights
}

/// How [`write_hf_model_with`] stores the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// F32, F16 or BF16.
    pub dtype: DType,
    /// 1: `model.safetensors`; more: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.
    pub shards: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            shards: 1,
        }
    }
}

/// Writes a Hugging Face model folder (f32, one safetensors file).
pub fn write_hf_model(dir: &Path, spec: &TinyModelSpec) -> Result<()> {
    write_hf_model_with(dir, spec, WriteOptions::default())
}

/// Writes a Hugging Face model folder: config.json, generation_config.json, tokenizer.json,
/// tokenizer_config.json (ChatML template) and the weights as `options` say.
pub fn write_hf_model_with(dir: &Path, spec: &TinyModelSpec, options: WriteOptions) -> Result<()> {
    ensure!(options.shards >= 1, "at least one shard");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tokenizer = tiny_tokenizer();
    let vocab_size = tiny_vocab_size();

    write_json(
        &dir.join("config.json"),
        &hf_config(spec, vocab_size, options.dtype),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": IM_START_ID,
            "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
            "transformers_version": "4.46.0",
        }),
    )?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(anyhow::Error::msg)
        .context("writing tokenizer.json")?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config(spec))?;

    let weights = tiny_weights(spec, vocab_size)
        .into_iter()
        .map(|(name, tensor)| Ok((name, tensor.to_dtype(options.dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    if options.shards == 1 {
        candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
        return Ok(());
    }
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let per_shard = names.len().div_ceil(options.shards);
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    for (index, chunk) in names.chunks(per_shard).enumerate() {
        let file = format!(
            "model-{:05}-of-{:05}.safetensors",
            index + 1,
            options.shards
        );
        let shard: HashMap<&str, Tensor> = chunk
            .iter()
            .map(|name| (name.as_str(), weights[*name].clone()))
            .collect();
        for (name, tensor) in &shard {
            weight_map.insert(name.to_string(), json!(file));
            total_size += tensor.elem_count() * tensor.dtype().size_in_bytes();
        }
        candle_core::safetensors::save(&shard, dir.join(&file))?;
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map }),
    )
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// config.json with the fields each family's `transformers` config class has.
fn hf_config(spec: &TinyModelSpec, vocab_size: usize, dtype: DType) -> Value {
    let (class, model_type) = match spec.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
    };
    let rope_scaling = match &spec.rope_scaling {
        None => Value::Null,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        Some(RopeScaling::Linear { factor }) => json!({ "rope_type": "linear", "factor": factor }),
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": IM_START_ID,
        "eos_token_id": IM_END_ID,
        "torch_dtype": torch_dtype(dtype),
        "use_cache": true,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "transformers_version": "4.46.0",
    });
    let fields = config.as_object_mut().expect("a JSON object");
    match spec.architecture {
        Architecture::Llama => {
            fields.insert("attention_bias".into(), json!(false));
            fields.insert("mlp_bias".into(), json!(false));
            fields.insert("pretraining_tp".into(), json!(1));
        }
        Architecture::Mistral => {
            fields.insert("sliding_window".into(), json!(spec.sliding_window));
        }
        Architecture::Qwen2 => {
            // Real Qwen2 configs carry a window they do not use: a loader must look at
            // use_sliding_window, not at sliding_window alone.
            fields.insert(
                "use_sliding_window".into(),
                json!(spec.sliding_window.is_some()),
            );
            fields.insert(
                "sliding_window".into(),
                json!(spec.sliding_window.unwrap_or(spec.max_position_embeddings)),
            );
            fields.insert("max_window_layers".into(), json!(spec.num_hidden_layers));
        }
        Architecture::Qwen3 => {
            fields.insert("attention_bias".into(), json!(false));
            fields.insert(
                "use_sliding_window".into(),
                json!(spec.sliding_window.is_some()),
            );
            fields.insert("sliding_window".into(), json!(spec.sliding_window));
            fields.insert("max_window_layers".into(), json!(spec.num_hidden_layers));
        }
    }
    config
}

fn tokenizer_config(spec: &TinyModelSpec) -> Value {
    let added_tokens_decoder: serde_json::Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            (
                id.to_string(),
                json!({
                    "content": content,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            )
        })
        .collect();
    json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": IM_END,
        "unk_token": ENDOFTEXT,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "GPT2Tokenizer",
    })
}

/// A `wick-shard` process a test started: killed on drop, its log printed when the test fails.
pub struct ShardProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl ShardProcess {
    /// Starts `binary serve --model-id model --uds-path uds args…`, stdout and stderr to `log`.
    pub fn spawn(binary: &Path, model: &Path, uds: &Path, args: &[&str], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("the shard log can be created");
        let child = Command::new(binary)
            .args(["serve", "--model-id"])
            .arg(model)
            .arg("--uds-path")
            .arg(uds)
            .args(args)
            .stdout(out.try_clone().expect("the log handle can be cloned"))
            .stderr(out)
            .spawn()
            .expect("wick-shard starts");
        Self { child, log }
    }
}

impl Drop for ShardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- wick-shard log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_json(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn weights_are_deterministic_and_seeded() {
        let spec = TinyModelSpec::llama();
        let vocab = tiny_vocab_size();
        let a = tiny_weights(&spec, vocab);
        let b = tiny_weights(&spec, vocab);
        let name = "model.layers.1.self_attn.q_proj.weight";
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a[name], &b[name]), 0.0);
        let other = tiny_weights(
            &TinyModelSpec {
                seed: 1,
                ..spec.clone()
            },
            vocab,
        );
        assert!(diff(&a[name], &other[name]) > 0.1);
        // Different tensors of one model are not copies of each other.
        let k = &a["model.layers.1.self_attn.k_proj.weight"];
        assert!(diff(&a[name].narrow(0, 0, 32).unwrap(), k) > 0.1);
    }

    #[test]
    fn weights_have_hf_names_shapes_and_scales() {
        let vocab = tiny_vocab_size();
        let llama = tiny_weights(&TinyModelSpec::llama(), vocab);
        assert_eq!(llama["model.embed_tokens.weight"].dims(), &[vocab, 64]);
        assert_eq!(llama["lm_head.weight"].dims(), &[vocab, 64]);
        assert_eq!(
            llama["model.layers.0.self_attn.q_proj.weight"].dims(),
            &[64, 64]
        );
        assert_eq!(
            llama["model.layers.0.self_attn.k_proj.weight"].dims(),
            &[32, 64]
        );
        assert_eq!(
            llama["model.layers.1.mlp.down_proj.weight"].dims(),
            &[64, 128]
        );
        assert_eq!(llama.len(), 2 + 1 + 2 * 9);
        let norm: Vec<f32> = llama["model.norm.weight"].to_vec1().unwrap();
        assert!(norm.iter().all(|v| (0.9..=1.1).contains(v)));
        let q: Vec<Vec<f32>> = llama["model.layers.0.self_attn.q_proj.weight"]
            .to_vec2()
            .unwrap();
        let bound = 2.0 / 8.0;
        assert!(q.iter().flatten().all(|v| v.abs() <= bound));
        let mean_abs = q.iter().flatten().map(|v| v.abs()).sum::<f32>() / 4096.0;
        assert!(
            mean_abs > bound / 3.0,
            "uniform values, not collapsed: {mean_abs}"
        );

        let qwen2 = tiny_weights(&TinyModelSpec::qwen2(), vocab);
        assert!(!qwen2.contains_key("lm_head.weight"));
        assert_eq!(qwen2["model.layers.0.self_attn.k_proj.bias"].dims(), &[32]);
        let qwen3 = tiny_weights(&TinyModelSpec::qwen3(), vocab);
        assert_eq!(
            qwen3["model.layers.0.self_attn.q_proj.weight"].dims(),
            &[128, 64]
        );
        assert_eq!(
            qwen3["model.layers.0.self_attn.o_proj.weight"].dims(),
            &[64, 128]
        );
        assert_eq!(
            qwen3["model.layers.0.self_attn.q_norm.weight"].dims(),
            &[32]
        );
        assert!(!qwen3.contains_key("model.layers.0.self_attn.q_proj.bias"));
    }

    #[test]
    fn hf_folder_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        for spec in [
            TinyModelSpec::llama(),
            TinyModelSpec::mistral(),
            TinyModelSpec::qwen2(),
            TinyModelSpec::qwen3(),
            TinyModelSpec::llama3(),
        ] {
            let path = dir.path().join(format!(
                "{:?}-{}",
                spec.architecture,
                spec.rope_scaling.is_some()
            ));
            write_hf_model(&path, &spec).unwrap();
            let config = read_json(&path.join("config.json"));
            assert_eq!(config["vocab_size"], tiny_vocab_size());
            assert_eq!(config["head_dim"], spec.head_dim);
            assert_eq!(config["tie_word_embeddings"], spec.tie_word_embeddings);
            match spec.architecture {
                Architecture::Llama => assert_eq!(config["architectures"][0], "LlamaForCausalLM"),
                Architecture::Mistral => {
                    assert_eq!(config["model_type"], "mistral");
                    assert_eq!(config["sliding_window"], 8);
                }
                Architecture::Qwen2 => {
                    assert_eq!(config["model_type"], "qwen2");
                    assert_eq!(config["use_sliding_window"], false);
                }
                Architecture::Qwen3 => assert_eq!(config["architectures"][0], "Qwen3ForCausalLM"),
            }
            if spec.rope_scaling.is_some() {
                assert_eq!(config["rope_scaling"]["rope_type"], "llama3");
                assert_eq!(
                    config["rope_scaling"]["original_max_position_embeddings"],
                    64
                );
            } else {
                assert!(config["rope_scaling"].is_null());
            }
            let generation = read_json(&path.join("generation_config.json"));
            assert_eq!(generation["eos_token_id"], json!([IM_END_ID, ENDOFTEXT_ID]));
            let tokenizer_config = read_json(&path.join("tokenizer_config.json"));
            assert_eq!(tokenizer_config["chat_template"], CHAT_TEMPLATE);
            assert_eq!(tokenizer_config["eos_token"], IM_END);

            let tokenizer = tokenizers::Tokenizer::from_file(path.join("tokenizer.json")).unwrap();
            let ids = tokenizer.encode("<|im_start|>user\nHello", false).unwrap();
            let expected = tiny_tokenizer()
                .encode("<|im_start|>user\nHello", false)
                .unwrap();
            assert_eq!(ids.get_ids(), expected.get_ids());

            let weights =
                candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu)
                    .unwrap();
            assert_eq!(weights.len(), tiny_weights(&spec, tiny_vocab_size()).len());
        }
    }

    #[test]
    fn hf_folder_in_bf16_and_two_shards() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyModelSpec::qwen2();
        let options = WriteOptions {
            dtype: DType::BF16,
            shards: 2,
        };
        write_hf_model_with(dir.path(), &spec, options).unwrap();
        assert!(!dir.path().join("model.safetensors").exists());
        let index = read_json(&dir.path().join("model.safetensors.index.json"));
        let map = index["weight_map"].as_object().unwrap();
        let expected = tiny_weights(&spec, tiny_vocab_size());
        assert_eq!(map.len(), expected.len());
        let mut loaded = HashMap::new();
        for file in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            let shard =
                candle_core::safetensors::load(dir.path().join(file), &Device::Cpu).unwrap();
            assert!(!shard.is_empty());
            for (name, tensor) in shard {
                assert_eq!(map[&name], file);
                assert_eq!(tensor.dtype(), DType::BF16);
                loaded.insert(name, tensor);
            }
        }
        assert_eq!(loaded.len(), expected.len());
        let name = "model.layers.0.self_attn.q_proj.bias";
        let back = loaded[name].to_dtype(DType::F32).unwrap();
        let err = (back - &expected[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-2);
        let total: usize = expected.values().map(|t| t.elem_count() * 2).sum();
        assert_eq!(index["metadata"]["total_size"], total);
        assert_eq!(
            read_json(&dir.path().join("config.json"))["torch_dtype"],
            "bfloat16"
        );
    }

    #[test]
    fn config_matches_spec() {
        let config = TinyModelSpec::qwen2().config(tiny_vocab_size());
        assert!(config.attention_bias && !config.qk_norm && config.tie_word_embeddings);
        assert_eq!(config.eos_token_ids, vec![IM_END_ID, ENDOFTEXT_ID]);
        let config = TinyModelSpec::qwen3().config(100);
        assert!(config.qk_norm && !config.attention_bias);
        assert_eq!(config.head_dim * config.num_attention_heads, 128);
    }
}
