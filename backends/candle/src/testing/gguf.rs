//! Tiny models as llama.cpp GGUF files: the weights of [`super::tiny_weights`] under llama.cpp
//! names, q/k rows permuted as llama.cpp's converter does, and the tiny tokenizer as metadata.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;

use super::tokenizer::{tiny_vocab, SPECIAL_TOKENS};
use super::{tiny_weights, TinyModelSpec, CHAT_TEMPLATE, IM_END_ID, IM_START_ID, RMS_NORM_EPS};
use wick_model::config::Architecture;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;

/// Reorders the rows of a q or k projection from Hugging Face's rope layout (each head's two
/// rotated halves are `[0, d/2)` and `[d/2, d)`) to llama.cpp's (rotated pairs interleaved:
/// `(0, 1), (2, 3), …`), as `permute(weights, n_head, n_head_kv)` in llama.cpp's
/// `convert_hf_to_gguf.py` does:
///
/// ```text
/// w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)
/// ```
///
/// with `n_head` = attention heads for q and KV heads for k. Per head of size `d`, the new row
/// `2i + j` is the old row `j * d/2 + i` (i < d/2, j ∈ {0, 1}).
pub(crate) fn permute_for_gguf(weight: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    weight
        .reshape((n_head, 2, rows / n_head / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Quantizes to `dtype` when the rows split into whole blocks; otherwise (and for vectors) keeps
/// f32, as llama.cpp keeps norms in f32.
fn store(tensor: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let quantizable = tensor.rank() == 2 && tensor.dim(1)? % dtype.block_size() == 0;
    let dtype = if quantizable { dtype } else { GgmlDType::F32 };
    Ok(QTensor::quantize(tensor, dtype)?)
}

/// Writes a llama-architecture GGUF file with the weights of [`tiny_weights`] and the
/// [`super::tiny_tokenizer`] vocabulary (`tokenizer.ggml.model = gpt2`, `pre = gpt-2`), linear
/// weights in `dtype` (f32 where a row is not a whole number of `dtype` blocks).
///
/// Only plain Llama specs: llama.cpp stores Mistral's window and Llama 3 rope scaling in other
/// ways (no window; a `rope_freqs` tensor), which these tests do not need.
pub fn write_gguf_model(path: &Path, spec: &TinyModelSpec, dtype: GgmlDType) -> Result<()> {
    ensure!(
        spec.architecture == Architecture::Llama
            && spec.rope_scaling.is_none()
            && spec.sliding_window.is_none(),
        "write_gguf_model writes plain Llama specs only, not {spec:?}"
    );
    let vocab = tiny_vocab();
    let weights = tiny_weights(spec, vocab.tokens.len());
    let hf = |name: &str| -> Result<&Tensor> {
        weights.get(name).with_context(|| format!("missing {name}"))
    };

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push((
        "token_embd.weight".into(),
        store(hf("model.embed_tokens.weight")?, dtype)?,
    ));
    tensors.push((
        "output_norm.weight".into(),
        store(hf("model.norm.weight")?, dtype)?,
    ));
    if !spec.tie_word_embeddings {
        tensors.push(("output.weight".into(), store(hf("lm_head.weight")?, dtype)?));
    }
    for i in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let q = permute_for_gguf(
            hf(&format!("{p}.self_attn.q_proj.weight"))?,
            spec.num_attention_heads,
        )?;
        let k = permute_for_gguf(
            hf(&format!("{p}.self_attn.k_proj.weight"))?,
            spec.num_key_value_heads,
        )?;
        let blk = |suffix: &str| format!("blk.{i}.{suffix}.weight");
        tensors.push((blk("attn_q"), store(&q, dtype)?));
        tensors.push((blk("attn_k"), store(&k, dtype)?));
        for (gguf, hf_name) in [
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            tensors.push((
                blk(gguf),
                store(hf(&format!("{p}.{hf_name}.weight"))?, dtype)?,
            ));
        }
    }

    let u32_of = |v: usize| Value::U32(v as u32);
    let token_types = vocab
        .tokens
        .iter()
        .map(|t| {
            let special = SPECIAL_TOKENS.contains(&t.as_str());
            Value::I32(if special {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_NORMAL
            })
        })
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("wick tiny llama".into())),
        ("llama.vocab_size", u32_of(vocab.tokens.len())),
        ("llama.context_length", u32_of(spec.max_position_embeddings)),
        ("llama.embedding_length", u32_of(spec.hidden_size)),
        ("llama.block_count", u32_of(spec.num_hidden_layers)),
        ("llama.feed_forward_length", u32_of(spec.intermediate_size)),
        (
            "llama.attention.head_count",
            u32_of(spec.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv",
            u32_of(spec.num_key_value_heads),
        ),
        ("llama.attention.key_length", u32_of(spec.head_dim)),
        ("llama.attention.value_length", u32_of(spec.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(RMS_NORM_EPS as f32),
        ),
        ("llama.rope.dimension_count", u32_of(spec.head_dim)),
        ("llama.rope.freq_base", Value::F32(spec.rope_theta)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(
                vocab
                    .tokens
                    .iter()
                    .map(|t| Value::String(t.clone()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.token_type", Value::Array(token_types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                vocab
                    .merges
                    .iter()
                    .map(|(l, r)| Value::String(format!("{l} {r}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(IM_START_ID)),
        ("tokenizer.ggml.eos_token_id", Value::U32(IM_END_ID)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];

    let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_tokenizer;
    use candle_core::Device;

    fn read(path: &Path) -> (gguf_file::Content, std::fs::File) {
        let mut file = std::fs::File::open(path).unwrap();
        (gguf_file::Content::read(&mut file).unwrap(), file)
    }

    #[test]
    fn permutation_follows_the_llama_cpp_formula() {
        // 2 heads of 4 rows, 3 columns; row r holds r*10 + column.
        let values: Vec<f32> = (0..8)
            .flat_map(|r| (0..3).map(move |c| (r * 10 + c) as f32))
            .collect();
        let w = Tensor::from_vec(values, (8, 3), &Device::Cpu).unwrap();
        let p: Vec<Vec<f32>> = permute_for_gguf(&w, 2).unwrap().to_vec2().unwrap();
        let first_column: Vec<f32> = p.iter().map(|row| row[0]).collect();
        // Head 0: old rows 0,1 | 2,3 -> 0,2,1,3; head 1 likewise from 4.
        assert_eq!(first_column, vec![0., 20., 10., 30., 40., 60., 50., 70.]);
        assert_eq!(p[1], vec![20., 21., 22.]);
    }

    /// Rope as Hugging Face applies it (halves) on HF rows equals rope as llama.cpp applies it
    /// (adjacent pairs) on permuted rows, with the rows then matched by the same permutation.
    #[test]
    fn permutation_turns_half_rope_into_interleaved_rope() {
        let d = 8;
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin() + 0.5).collect();
        let position = 5.0f32;
        let angle = |i: usize| position * 10_000f32.powf(-2.0 * i as f32 / d as f32);
        let mut hf = q.clone();
        for i in 0..d / 2 {
            let (a, b) = (q[i], q[i + d / 2]);
            let (s, c) = angle(i).sin_cos();
            hf[i] = a * c - b * s;
            hf[i + d / 2] = a * s + b * c;
        }
        let column = |v: &[f32]| Tensor::from_slice(v, (d, 1), &Device::Cpu).unwrap();
        let permuted: Vec<f32> = permute_for_gguf(&column(&q), 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut interleaved = permuted.clone();
        for i in 0..d / 2 {
            let (a, b) = (permuted[2 * i], permuted[2 * i + 1]);
            let (s, c) = angle(i).sin_cos();
            interleaved[2 * i] = a * c - b * s;
            interleaved[2 * i + 1] = a * s + b * c;
        }
        let expected: Vec<f32> = permute_for_gguf(&column(&hf), 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, y) in interleaved.iter().zip(&expected) {
            assert!((x - y).abs() < 1e-6, "{interleaved:?} vs {expected:?}");
        }
    }

    #[test]
    fn gguf_holds_permuted_weights_and_hyper_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = TinyModelSpec::llama();
        write_gguf_model(&path, &spec, GgmlDType::Q8_0).unwrap();
        let (content, mut file) = read(&path);
        let meta = &content.metadata;
        assert_eq!(meta["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(meta["llama.attention.head_count_kv"].to_u32().unwrap(), 2);
        assert_eq!(meta["llama.attention.key_length"].to_u32().unwrap(), 16);
        assert_eq!(meta["llama.block_count"].to_u32().unwrap(), 2);
        let names = content.tensor_infos.len();
        assert_eq!(names, 3 + 2 * 9);

        let weights = tiny_weights(&spec, tiny_vocab().tokens.len());
        let k = content
            .tensor(&mut file, "blk.1.attn_k.weight", &Device::Cpu)
            .unwrap();
        assert_eq!(k.dtype(), GgmlDType::Q8_0);
        assert_eq!(k.shape().dims(), &[32, 64]);
        let expected =
            permute_for_gguf(&weights["model.layers.1.self_attn.k_proj.weight"], 2).unwrap();
        let err = (k.dequantize(&Device::Cpu).unwrap() - &expected)
            .unwrap()
            .abs()
            .unwrap();
        assert!(err.max_all().unwrap().to_scalar::<f32>().unwrap() < 0.01);
        // Unpermuted, the rows would differ by far more than the quantization error.
        let unpermuted = &weights["model.layers.1.self_attn.k_proj.weight"];
        let far = (k.dequantize(&Device::Cpu).unwrap() - unpermuted)
            .unwrap()
            .abs()
            .unwrap();
        assert!(far.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.05);

        let norm = content
            .tensor(&mut file, "blk.0.attn_norm.weight", &Device::Cpu)
            .unwrap();
        assert_eq!(norm.dtype(), GgmlDType::F32);
        // Q4K blocks are 256 wide: 64-wide rows stay f32.
        write_gguf_model(&path, &spec, GgmlDType::Q4K).unwrap();
        let (content, mut file) = read(&path);
        let q = content
            .tensor(&mut file, "blk.0.attn_q.weight", &Device::Cpu)
            .unwrap();
        assert_eq!(q.dtype(), GgmlDType::F32);
    }

    #[test]
    fn rejects_non_llama_specs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        assert!(write_gguf_model(&path, &TinyModelSpec::qwen2(), GgmlDType::F32).is_err());
        assert!(write_gguf_model(&path, &TinyModelSpec::llama3(), GgmlDType::F32).is_err());
    }

    #[test]
    fn gguf_tokenizer_matches_tiny_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = TinyModelSpec {
            tie_word_embeddings: true,
            ..TinyModelSpec::llama()
        };
        write_gguf_model(&path, &spec, GgmlDType::F32).unwrap();
        let (content, _) = read(&path);
        assert!(!content.tensor_infos.contains_key("output.weight"));
        let gguf = crate::gguf_tokenizer::from_gguf(&content).unwrap();
        assert_eq!(gguf.chat_template.as_deref(), Some(CHAT_TEMPLATE));
        assert_eq!(gguf.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(gguf.eos_token.as_deref(), Some("<|im_end|>"));

        let reference = tiny_tokenizer();
        assert_eq!(
            gguf.tokenizer.get_vocab_size(true),
            reference.get_vocab_size(true)
        );
        for text in [
            "What is the capital of France?",
            "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
            "numbers 2024 and 365, café, 日本語, 🦀",
            "  spaces   and\ttabs\n\n<|endoftext|>",
        ] {
            let expected = reference.encode(text, true).unwrap();
            let got = gguf.tokenizer.encode(text, true).unwrap();
            assert_eq!(got.get_ids(), expected.get_ids(), "{text:?}");
            for skip in [false, true] {
                assert_eq!(
                    gguf.tokenizer.decode(got.get_ids(), skip).unwrap(),
                    reference.decode(expected.get_ids(), skip).unwrap()
                );
            }
            assert_eq!(gguf.tokenizer.decode(got.get_ids(), false).unwrap(), text);
        }
    }
}
