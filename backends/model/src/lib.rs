//! What wick's launcher and its shards share about a model, with no engine behind it:
//! - [`source`]: where `--model-id` points (a local folder, a `.gguf` file, a Hub id) and the
//!   files it resolves to, downloaded through hf-hub unless offline;
//! - [`config`]: the decoder's hyper-parameters, from `config.json` or GGUF metadata, and
//!   whether they split over a number of shards;
//! - [`gguf`]: a GGUF file's header (metadata and tensor table), read without tensor data.
//!
//! The launcher resolves and checks a model with this crate alone; the shard resolves it the
//! same way and then loads it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value as Json;

pub mod config;
pub mod gguf;
pub mod source;

use config::ModelConfig;
use source::{ModelFiles, ModelSource};

/// A model found on local disk, with its config read (so its architecture is supported).
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
}

impl ResolvedModel {
    /// What a shard loads: the model's folder or its `.gguf` file.
    pub fn path(&self) -> &Path {
        match &self.files {
            ModelFiles::Gguf(path) => path,
            ModelFiles::Hf(files) => files.config.parent().unwrap_or(Path::new(".")),
        }
    }
}

/// Resolves `model_id` to local files (downloading a Hub id unless `offline`; see
/// [`ModelSource::parse`] and [`ModelSource::resolve`]) and reads its config, which fails for
/// an architecture wick cannot run. Tensor data is not read.
pub fn resolve(
    model_id: &str,
    revision: Option<&str>,
    hub_cache: Option<PathBuf>,
    offline: bool,
) -> Result<ResolvedModel> {
    let files = ModelSource::parse(model_id, revision)?.resolve(hub_cache, offline)?;
    let config = match &files {
        ModelFiles::Gguf(path) => ModelConfig::from_gguf(&gguf::Header::read_file(path)?)
            .with_context(|| format!("reading the model config of {}", path.display()))?,
        ModelFiles::Hf(hf) => {
            let generation = hf.generation_config.as_deref().map(read_json).transpose()?;
            ModelConfig::from_hf(&read_json(&hf.config)?, generation.as_ref())
                .with_context(|| format!("reading {}", hf.config.display()))?
        }
    };
    Ok(ResolvedModel { files, config })
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<Json> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Parses a byte size: a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 2GiB or 512MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    Ok((number * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::Architecture;

    /// A Hugging Face folder with the files resolution looks for; only the config is read.
    fn hf_folder(architecture: &str, model_type: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "eos_token_id": 2,
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        dir
    }

    #[test]
    fn a_local_folder_resolves_to_itself() {
        let dir = hf_folder("Qwen2ForCausalLM", "qwen2");
        let model = resolve(dir.path().to_str().unwrap(), None, None, true).unwrap();
        assert_eq!(model.path(), dir.path());
        assert_eq!(model.config.architecture, Architecture::Qwen2);
        assert_eq!(model.config.num_key_value_heads, 2);
        assert_eq!(model.config.eos_token_ids, [2]);
    }

    #[test]
    fn an_unsupported_architecture_is_named() {
        let dir = hf_folder("BloomForCausalLM", "bloom");
        let err = resolve(dir.path().to_str().unwrap(), None, None, true).unwrap_err();
        assert!(format!("{err:#}").contains("BloomForCausalLM"), "{err:#}");
    }

    #[test]
    fn a_missing_path_fails() {
        let err = resolve("/nonexistent/wick-model", None, None, true).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    }

    #[test]
    fn a_gguf_file_resolves_to_its_metadata() {
        let mut w = gguf::Writer::new(3, 1, 9);
        w.string("general.architecture").u32(8).string("llama");
        for (key, value) in [
            ("llama.embedding_length", 64),
            ("llama.feed_forward_length", 128),
            ("llama.block_count", 2),
            ("llama.attention.head_count", 4),
            ("llama.attention.head_count_kv", 2),
            ("llama.context_length", 512),
            ("tokenizer.ggml.eos_token_id", 7),
        ] {
            w.string(key).u32(4).u32(value);
        }
        w.string("llama.attention.layer_norm_rms_epsilon")
            .u32(6)
            .u32(1e-5f32.to_bits());
        // No token list: the vocabulary is the embedding's row count.
        w.string("token_embd.weight")
            .u32(2)
            .u64(64)
            .u64(300)
            .u32(0)
            .u64(0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, &w.0).unwrap();

        let model = resolve(path.to_str().unwrap(), None, None, true).unwrap();
        assert_eq!(model.path(), path);
        let c = &model.config;
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.hidden_size, c.intermediate_size), (64, 128));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads), (4, 2));
        assert_eq!((c.head_dim, c.vocab_size), (16, 300));
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.eos_token_ids, [7]);
        // No `output.weight`: the LM head is the embedding.
        assert!(c.tie_word_embeddings);

        // A file that is not GGUF fails with the file named.
        std::fs::write(&path, b"not a model").unwrap();
        let err = resolve(path.to_str().unwrap(), None, None, true).unwrap_err();
        assert!(format!("{err:#}").contains("bad magic"), "{err:#}");
    }

    #[test]
    fn a_model_splits_over_shards_that_divide_its_heads() {
        let dir = hf_folder("LlamaForCausalLM", "llama");
        let config = resolve(dir.path().to_str().unwrap(), None, None, true)
            .unwrap()
            .config;
        assert!(config.check_split(1).is_ok());
        assert!(config.check_split(2).is_ok());
        let err = config.check_split(4).unwrap_err().to_string();
        assert!(err.contains("4 attention heads and 2 KV heads"), "{err}");
        assert!(config.check_split(0).is_err());
    }

    #[test]
    fn byte_sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("1234"), Ok(1234));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("2XB").is_err());
    }
}
