//! Finds the model once, before any child starts: Hub ids are downloaded here (so shards never
//! race each other to the Hub), and the config is read to reject an unsupported architecture
//! with a clear message instead of a shard crash.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value as Json;
use wick_backend_candle::config::ModelConfig;
use wick_backend_candle::source::{ModelFiles, ModelSource};

/// A model found on local disk, with its architecture checked.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// What the shards load: the model's folder or its `.gguf` file.
    pub path: PathBuf,
    pub config: ModelConfig,
}

/// Resolves `--model-id` to local files (downloading a Hub id unless `offline`) and reads its
/// config, which fails for an architecture the shard cannot run.
pub fn resolve(
    model_id: &str,
    revision: Option<&str>,
    hub_cache: Option<PathBuf>,
    offline: bool,
) -> Result<ResolvedModel> {
    let source = ModelSource::parse(model_id, revision)?;
    let files = source
        .resolve(hub_cache, offline)
        .with_context(|| format!("cannot find the files of model {model_id}"))?;
    match files {
        ModelFiles::Gguf(path) => {
            let config = gguf_config(&path)?;
            Ok(ResolvedModel { path, config })
        }
        ModelFiles::Hf(files) => {
            let config_json = read_json(&files.config)?;
            let generation = files
                .generation_config
                .as_deref()
                .map(read_json)
                .transpose()?;
            let config = ModelConfig::from_hf(&config_json, generation.as_ref())
                .with_context(|| format!("model {model_id}"))?;
            let path = files
                .config
                .parent()
                .map(Path::to_path_buf)
                .context("config.json has no parent folder")?;
            Ok(ResolvedModel { path, config })
        }
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Reads only the GGUF header and metadata (no tensor data).
fn gguf_config(path: &Path) -> Result<ModelConfig> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
    ModelConfig::from_gguf(&content).with_context(|| format!("model {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_backend_candle::config::Architecture;
    use wick_backend_candle::testing::{write_hf_model, TinyModelSpec};

    #[test]
    fn local_folder_resolves_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        write_hf_model(dir.path(), &TinyModelSpec::qwen2()).unwrap();
        let model = resolve(dir.path().to_str().unwrap(), None, None, true).unwrap();
        assert_eq!(model.path, dir.path());
        assert_eq!(model.config.architecture, Architecture::Qwen2);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_hf_model(dir.path(), &TinyModelSpec::llama()).unwrap();
        let config_path = dir.path().join("config.json");
        let mut config = read_json(&config_path).unwrap();
        config["architectures"] = serde_json::json!(["BloomForCausalLM"]);
        config["model_type"] = serde_json::json!("bloom");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let err = resolve(dir.path().to_str().unwrap(), None, None, true).unwrap_err();
        assert!(format!("{err:#}").contains("BloomForCausalLM"), "{err:#}");
    }

    #[test]
    fn missing_path_fails() {
        let err = resolve("/nonexistent/wick-model", None, None, true).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    }
}
