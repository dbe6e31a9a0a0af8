//! How a model's files become weights, a tokenizer and a chat template. Where they are and
//! what the config says is `wick_model`'s (the launcher resolves models the same way).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::Value as Json;
use tokenizers::Tokenizer;
use wick_model::config::{llama3_scaling_from_freq_factors, Architecture, ModelConfig};
use wick_model::read_json;
use wick_model::source::{HfFiles, ModelFiles};

use crate::gguf_tokenizer;
use crate::weights::{LoadOptions, WeightStore};

/// Everything the shard needs from a model, loaded.
pub struct LoadedModel {
    pub model_id: String,
    pub config: ModelConfig,
    pub weights: WeightStore,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model_id", &self.model_id)
            .field("config", &self.config)
            .field("weights", &self.weights)
            .field(
                "chat_template",
                &self.chat_template.as_ref().map(|t| t.len()),
            )
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Resolves `model_id` (see [`wick_model::resolve`]) and loads config, weights, tokenizer
/// and chat template. The config is checked before any weight is touched, so an unsupported
/// architecture fails fast with its name.
pub fn load(
    model_id: &str,
    revision: Option<&str>,
    hub_cache: Option<std::path::PathBuf>,
    offline: bool,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let resolved = wick_model::resolve(model_id, revision, hub_cache, offline)?;
    let loaded = match &resolved.files {
        ModelFiles::Gguf(path) => load_gguf(model_id, path, resolved.config)?,
        ModelFiles::Hf(files) => load_hf(model_id, files, resolved.config)?,
    };
    tracing::info!(
        model_id,
        architecture = ?loaded.config.architecture,
        layers = loaded.config.num_hidden_layers,
        weight_format = loaded.weights.compute_format(opts),
        "model files loaded"
    );
    Ok(loaded)
}

fn load_gguf(model_id: &str, path: &Path, mut config: ModelConfig) -> Result<LoadedModel> {
    let (weights, content) = WeightStore::from_gguf_file(path)?;
    // llama.cpp keeps Llama 3 rope scaling as a per-frequency factor tensor, not metadata.
    if config.architecture == Architecture::Llama
        && config.rope_scaling.is_none()
        && weights.contains("rope_freqs.weight")
    {
        let factors = weights
            .tensor("rope_freqs.weight", DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        config.rope_scaling = Some(llama3_scaling_from_freq_factors(
            &factors,
            config.head_dim,
            config.rope_theta,
        )?);
    }
    let tok = gguf_tokenizer::from_gguf(&content)
        .with_context(|| format!("building the tokenizer from {}", path.display()))?;
    Ok(LoadedModel {
        model_id: model_id.to_string(),
        config,
        weights,
        tokenizer: tok.tokenizer,
        chat_template: tok.chat_template,
        bos_token: tok.bos_token,
        eos_token: tok.eos_token,
    })
}

fn load_hf(model_id: &str, files: &HfFiles, config: ModelConfig) -> Result<LoadedModel> {
    let tokenizer = Tokenizer::from_file(&files.tokenizer)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading {}", files.tokenizer.display()))?;
    let tokenizer_config = files
        .tokenizer_config
        .as_deref()
        .map(read_json)
        .transpose()?;

    let chat_template = chat_template(files, tokenizer_config.as_ref())?;
    let special = |key: &str, fallback: Option<u32>| {
        tokenizer_config
            .as_ref()
            .and_then(|tc| token_string(tc.get(key)))
            .or_else(|| fallback.and_then(|id| tokenizer.id_to_token(id)))
    };
    let bos_token = special("bos_token", config.bos_token_id);
    let eos_token = special("eos_token", config.eos_token_ids.first().copied());

    let weights = WeightStore::from_safetensors(&files.safetensors)?;
    Ok(LoadedModel {
        model_id: model_id.to_string(),
        config,
        weights,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
    })
}

/// The chat template: `chat_template.jinja`, else `chat_template.json`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` of which
/// `default` is taken).
fn chat_template(files: &HfFiles, tokenizer_config: Option<&Json>) -> Result<Option<String>> {
    if let Some(path) = &files.chat_template_jinja {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(Some(text));
    }
    if let Some(path) = &files.chat_template_json {
        if let Some(t) = template_value(read_json(path)?.get("chat_template")) {
            return Ok(Some(t));
        }
    }
    Ok(tokenizer_config.and_then(|tc| template_value(tc.get("chat_template"))))
}

fn template_value(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => {
            let template_of = |entry: &Json| {
                entry
                    .get("template")
                    .and_then(Json::as_str)
                    .map(str::to_string)
            };
            named
                .iter()
                .find(|e| e.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(template_of)
        }
        _ => None,
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}
