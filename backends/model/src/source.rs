//! Where a model comes from — a local Hugging Face folder, a local `.gguf` file or a Hugging
//! Face Hub id — and which of its files the shard loads.
//!
//! Configuration (cache folder, offline mode) enters as arguments: this module reads no
//! environment variables.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};

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

/// The safetensors files of a Hugging Face model folder: the shards named by
/// `model.safetensors.index.json` (each once, in name order), else `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let shards = shard_names(&index)?;
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "no model.safetensors or model.safetensors.index.json in {}",
        dir.display()
    )
}

/// The distinct shard file names in a `model.safetensors.index.json`'s `weight_map`.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: shard of {tensor} is not a string", index.display()))?;
        // Shard names are plain file names next to the index; refuse paths that leave the folder.
        if file.contains('/') || file.contains('\\') || file == ".." {
            bail!(
                "{}: shard name {file:?} is not a plain file name",
                index.display()
            );
        }
        files.insert(file.to_string());
    }
    if files.is_empty() {
        bail!("{} lists no shards", index.display());
    }
    Ok(files.into_iter().collect())
}
