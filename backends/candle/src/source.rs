//! Where a model comes from — a local Hugging Face folder, a local `.gguf` file or a Hugging
//! Face Hub id — and how its files become a config, weights, a tokenizer and a chat template.
//!
//! Configuration (cache folder, offline mode) enters as arguments: this module reads no
//! environment variables.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::config::{llama3_scaling_from_freq_factors, Architecture, ModelConfig};
use crate::gguf_tokenizer;
use crate::weights::{safetensors_files, shard_names, LoadOptions, WeightStore};

/// Where `--model-id` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder in Hugging Face layout (`config.json`, `tokenizer.json`, `*.safetensors`).
    Dir(PathBuf),
    /// A single GGUF file (tokenizer and chat template come from its metadata).
    Gguf(PathBuf),
    /// A Hugging Face Hub repository.
    Hub { repo: String, revision: String },
}

/// The files of a Hugging Face-layout model, wherever they were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    pub chat_template_json: Option<PathBuf>,
    pub chat_template_jinja: Option<PathBuf>,
    /// One `model.safetensors`, or every shard of `model.safetensors.index.json`.
    pub safetensors: Vec<PathBuf>,
}

/// A model's local files, ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    Hf(HfFiles),
    Gguf(PathBuf),
}

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const CHAT_TEMPLATE_JSON: &str = "chat_template.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

impl ModelSource {
    /// Classifies a `--model-id`: an existing folder, an existing `.gguf` file, or else a Hub id
    /// (`org/name` or `name`). A string that looks like a path but names nothing is an error
    /// rather than a Hub lookup that would fail less clearly.
    pub fn parse(model_id: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(model_id);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        if path.is_file() {
            if has_gguf_extension(model_id) {
                return Ok(ModelSource::Gguf(path.to_path_buf()));
            }
            bail!("model path {model_id} is a file but not a .gguf file (pass a folder in Hugging Face layout or a .gguf file)");
        }
        if looks_like_path(model_id) || !is_hub_id(model_id) {
            bail!("model path {model_id} does not exist");
        }
        Ok(ModelSource::Hub {
            repo: model_id.to_string(),
            revision: revision.unwrap_or("main").to_string(),
        })
    }

    /// Finds (and for the Hub, downloads unless `offline`) the model's files.
    ///
    /// `hub_cache` is the Hub cache folder itself (`HUGGINGFACE_HUB_CACHE`, or `$HF_HOME/hub`);
    /// `None` means hf-hub's default, `~/.cache/huggingface/hub`.
    pub fn resolve(&self, hub_cache: Option<PathBuf>, offline: bool) -> Result<ModelFiles> {
        match self {
            ModelSource::Dir(dir) => Ok(ModelFiles::Hf(hf_files_in_dir(dir)?)),
            ModelSource::Gguf(path) => Ok(ModelFiles::Gguf(path.clone())),
            ModelSource::Hub { repo, revision } => {
                let cache_dir = hub_cache.unwrap_or_else(|| Cache::default().path().clone());
                if offline {
                    return hub_offline(repo, revision, &cache_dir).map(ModelFiles::Hf);
                }
                match hub_download(repo, revision, &cache_dir) {
                    Ok(files) => Ok(ModelFiles::Hf(files)),
                    // No network, but a complete earlier download: serve that rather than fail.
                    Err(e) => match hub_offline(repo, revision, &cache_dir) {
                        Ok(files) => {
                            tracing::warn!(
                                model_id = repo.as_str(),
                                error = format!("{e:#}"),
                                "Hugging Face Hub unreachable; using the cached snapshot"
                            );
                            Ok(ModelFiles::Hf(files))
                        }
                        Err(_) => Err(e),
                    },
                }
            }
        }
    }
}

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

/// Resolves `model_id` (see [`ModelSource::parse`] and [`ModelSource::resolve`]) and loads
/// config, weights, tokenizer and chat template. The config is checked before any weight is
/// touched, so an unsupported architecture fails fast with its name.
pub fn load(
    model_id: &str,
    revision: Option<&str>,
    hub_cache: Option<PathBuf>,
    offline: bool,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let source = ModelSource::parse(model_id, revision)?;
    let files = source.resolve(hub_cache, offline)?;
    let loaded = match files {
        ModelFiles::Gguf(path) => load_gguf(model_id, &path)?,
        ModelFiles::Hf(files) => load_hf(model_id, &files)?,
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

fn load_gguf(model_id: &str, path: &Path) -> Result<LoadedModel> {
    let (weights, content) = WeightStore::from_gguf_file(path)?;
    let mut config = ModelConfig::from_gguf(&content)
        .with_context(|| format!("reading the model config of {}", path.display()))?;
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

fn load_hf(model_id: &str, files: &HfFiles) -> Result<LoadedModel> {
    let config_json = read_json(&files.config)?;
    let generation_config = files
        .generation_config
        .as_deref()
        .map(read_json)
        .transpose()?;
    let config = ModelConfig::from_hf(&config_json, generation_config.as_ref())
        .with_context(|| format!("reading {}", files.config.display()))?;

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

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The files of a local folder in Hugging Face layout.
pub fn hf_files_in_dir(dir: &Path) -> Result<HfFiles> {
    let required = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!("{name} not found in model folder {}", dir.display())
        }
    };
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    Ok(HfFiles {
        config: required(CONFIG)?,
        tokenizer: required(TOKENIZER)?,
        tokenizer_config: optional(TOKENIZER_CONFIG),
        generation_config: optional(GENERATION_CONFIG),
        chat_template_json: optional(CHAT_TEMPLATE_JSON),
        chat_template_jinja: optional(CHAT_TEMPLATE_JINJA),
        safetensors: {
            let files = safetensors_files(dir)?;
            if let Some(missing) = files.iter().find(|p| !p.is_file()) {
                bail!(
                    "shard {} listed in {SAFETENSORS_INDEX} is missing",
                    missing.display()
                );
            }
            files
        },
    })
}

/// The snapshot folder of `repo@revision` in the Hub cache, without network: through
/// `refs/{revision}` (a branch or tag), or `snapshots/{revision}` for a commit hash.
fn hub_offline(repo: &str, revision: &str, cache_dir: &Path) -> Result<HfFiles> {
    let not_cached = || {
        anyhow::anyhow!(
            "model {repo} is not in the Hugging Face cache at {} and offline mode is on",
            cache_dir.display()
        )
    };
    let cache = Cache::new(cache_dir.to_path_buf());
    let cache_repo = cache.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let snapshot = match cache_repo.get(CONFIG) {
        Some(config) => config
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(not_cached)?,
        None => {
            let folder = Repo::new(repo.to_string(), RepoType::Model).folder_name();
            let by_commit = cache_dir.join(folder).join("snapshots").join(revision);
            if by_commit.join(CONFIG).is_file() {
                by_commit
            } else {
                return Err(not_cached());
            }
        }
    };
    hf_files_in_dir(&snapshot).map_err(|e| not_cached().context(format!("{e:#}")))
}

/// Downloads (or finds in the cache) the files the shard needs from the Hub.
fn hub_download(repo: &str, revision: &str, cache_dir: &Path) -> Result<HfFiles> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(cache_dir.to_path_buf()))
        .with_progress(false)
        .build()
        .context("starting the Hugging Face Hub client")?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = api_repo.info().with_context(|| {
        format!("looking up model {repo} (revision {revision}) on the Hugging Face Hub")
    })?;
    let listed = |name: &str| info.siblings.iter().any(|s| s.rfilename == name);
    let get = |name: &str| -> Result<PathBuf> {
        api_repo
            .get(name)
            .with_context(|| format!("downloading {name} of {repo} from the Hugging Face Hub"))
    };
    let optional = |name: &str| -> Result<Option<PathBuf>> {
        if listed(name) {
            get(name).map(Some)
        } else {
            Ok(None)
        }
    };
    let safetensors = if listed(SAFETENSORS_INDEX) {
        let index = get(SAFETENSORS_INDEX)?;
        shard_names(&index)?
            .iter()
            .map(|shard| get(shard))
            .collect::<Result<Vec<_>>>()?
    } else if listed(SAFETENSORS) {
        vec![get(SAFETENSORS)?]
    } else {
        bail!("model {repo} has no model.safetensors or model.safetensors.index.json on the Hub (only safetensors checkpoints are supported)");
    };
    Ok(HfFiles {
        config: get(CONFIG)?,
        tokenizer: get(TOKENIZER)?,
        tokenizer_config: optional(TOKENIZER_CONFIG)?,
        generation_config: optional(GENERATION_CONFIG)?,
        chat_template_json: optional(CHAT_TEMPLATE_JSON)?,
        chat_template_jinja: optional(CHAT_TEMPLATE_JINJA)?,
        safetensors,
    })
}

fn has_gguf_extension(s: &str) -> bool {
    Path::new(s)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Strings a user means as a local path: absolute, relative with `.`/`~`, or a `.gguf` name.
fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.contains('\\')
        || has_gguf_extension(s)
}

/// `name` or `org/name` with the characters the Hub allows.
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}
