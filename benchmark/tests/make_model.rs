//! `wick-bench make-model` writes a GGUF that a GGUF reader takes as the named shape: its
//! metadata, every tensor's name, shape and type, the default model's tokenizer, and weights of
//! the stated spread. (That wick and llama.cpp serve such files is what the benchmarks in the
//! README do with them.)

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;

fn default_model() -> PathBuf {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: `make model` fetches it",
        path.display()
    );
    path
}

fn read(path: &Path) -> (Content, File) {
    let mut file = File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    (content, file)
}

fn strings(content: &Content, key: &str) -> Vec<String> {
    match content.metadata.get(key) {
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => panic!("{key}: {other:?}"),
            })
            .collect(),
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn make_model_writes_the_named_shape_with_the_default_models_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-shape.gguf");
    let source = default_model();
    let status = Command::new(env!("CARGO_BIN_EXE_wick-bench"))
        .args(["make-model", "--shape", "smollm2-135m", "--format", "q4_0"])
        .args(["--context", "16384", "--seed", "7", "--tokenizer-from"])
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    let (model, mut file) = read(&out);
    let number = |key: &str| match model.metadata.get(key) {
        Some(Value::U32(v)) => *v,
        other => panic!("{key}: {other:?}"),
    };
    for (key, want) in [
        ("llama.context_length", 16384),
        ("llama.block_count", 30),
        ("llama.embedding_length", 576),
        ("llama.feed_forward_length", 1536),
        ("llama.attention.head_count", 9),
        ("llama.attention.head_count_kv", 3),
        ("llama.rope.dimension_count", 64),
        ("llama.vocab_size", 49152),
    ] {
        assert_eq!(number(key), want, "{key}");
    }
    let (tokenizer, _) = read(&source);
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        assert_eq!(strings(&model, key), strings(&tokenizer, key), "{key}");
    }
    assert!(model.metadata.contains_key("tokenizer.chat_template"));

    // The embedding (tied output), two norms per layer and the final one, seven matrices per
    // layer.
    assert_eq!(model.tensor_infos.len(), 1 + 1 + 30 * 9);
    for (name, dims, dtype) in [
        ("token_embd.weight", [49152, 576], GgmlDType::Q4_0),
        ("blk.0.attn_q.weight", [576, 576], GgmlDType::Q4_0),
        ("blk.0.attn_k.weight", [192, 576], GgmlDType::Q4_0),
        ("blk.29.attn_v.weight", [192, 576], GgmlDType::Q4_0),
        ("blk.29.attn_output.weight", [576, 576], GgmlDType::Q4_0),
        ("blk.7.ffn_gate.weight", [1536, 576], GgmlDType::Q4_0),
        ("blk.7.ffn_up.weight", [1536, 576], GgmlDType::Q4_0),
        ("blk.7.ffn_down.weight", [576, 1536], GgmlDType::Q4_0),
    ] {
        let info = &model.tensor_infos[name];
        assert_eq!(info.shape.dims(), &dims, "{name}");
        assert_eq!(info.ggml_dtype, dtype, "{name}");
    }
    let norm = &model.tensor_infos["blk.12.ffn_norm.weight"];
    assert_eq!(
        (norm.shape.dims(), norm.ggml_dtype),
        (&[576][..], GgmlDType::F32)
    );

    // Normal weights with std 0.02 (Q4_0's rounding adds about 7% of that in quadrature).
    let up = model
        .tensor(&mut file, "blk.7.ffn_up.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let n = up.len() as f64;
    let mean = up.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (up.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-3, "mean {mean}");
    assert!((0.019..0.022).contains(&std), "std {std}");
}
