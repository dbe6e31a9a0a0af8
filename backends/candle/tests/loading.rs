//! Model loading: config parsing, safetensors (single, sharded, bf16), load-time quantization,
//! GGUF (names, llama.cpp's q/k row permutation), and model sources (folders, GGUF files, the
//! Hub cache offline).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use wick_backend_candle::linear::Linear;
use wick_backend_candle::source::load;
use wick_backend_candle::testing::{self, TinyModelSpec, WriteOptions};
use wick_backend_candle::weights::{gguf_tensor_name, LoadOptions, Quantize, WeightStore};
use wick_model::config::{
    llama3_freq_factors, llama3_scaling_from_freq_factors, Architecture, ModelConfig, RopeScaling,
};
use wick_model::source::ModelSource;

// ---------------------------------------------------------------------------------------------
// config.json

fn llama31_8b_instruct() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3",
        "use_cache": true,
        "vocab_size": 128256
    })
}

#[test]
fn llama31_config_with_llama3_rope_scaling() {
    let c = ModelConfig::from_hf(&llama31_8b_instruct(), None).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(c.hidden_size, 4096);
    assert_eq!(c.num_key_value_heads, 8);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
    assert_eq!(c.max_position_embeddings, 131072);
    assert!(!c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.bos_token_id, Some(128000));
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
}

#[test]
fn smollm2_config() {
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": null,
        "rope_theta": 100000,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "vocab_size": 49152
    });
    let c = ModelConfig::from_hf(&config, None).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rope_scaling, None);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.rms_norm_eps, 1e-5);

    // Sizes no model has fail with their name, before anything is sized by them.
    for (key, value) in [
        ("max_position_embeddings", json!(1u64 << 40)),
        ("hidden_size", json!(0)),
        ("vocab_size", json!(u64::MAX)),
    ] {
        let mut bad = config.clone();
        bad[key] = value;
        let e = ModelConfig::from_hf(&bad, None).unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
}

fn mistral_7b_v01() -> serde_json::Value {
    json!({
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000
    })
}

#[test]
fn mistral_config_with_sliding_window() {
    let c = ModelConfig::from_hf(&mistral_7b_v01(), None).unwrap();
    assert_eq!(c.architecture, Architecture::Mistral);
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.head_dim, 128);
    assert!(!c.attention_bias);

    // Mistral v0.2+ writes `"sliding_window": null`; v0.3 drops rope_theta's default 10000.
    let mut v02 = mistral_7b_v01();
    v02["sliding_window"] = serde_json::Value::Null;
    v02["rope_theta"] = json!(1000000.0);
    let c = ModelConfig::from_hf(&v02, None).unwrap();
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.rope_theta, 1e6);
}

#[test]
fn qwen25_config_ignores_disabled_sliding_window() {
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": 151936
    });
    let generation = json!({
        "bos_token_id": 151643,
        "do_sample": true,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "repetition_penalty": 1.1,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8
    });
    let c = ModelConfig::from_hf(&config, Some(&generation)).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!(c.sliding_window, None);
    assert!(c.tie_word_embeddings);
    assert!(c.attention_bias, "Qwen2 always has q/k/v bias");
    assert!(!c.qk_norm);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.eos_token_ids, vec![151645, 151643]);

    let mut enabled = config.clone();
    enabled["use_sliding_window"] = json!(true);
    let c = ModelConfig::from_hf(&enabled, None).unwrap();
    assert_eq!(c.sliding_window, Some(32768));
}

#[test]
fn qwen3_config_with_explicit_head_dim() {
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": null,
        "rope_theta": 1000000,
        "sliding_window": null,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "use_sliding_window": false,
        "vocab_size": 151936
    });
    let c = ModelConfig::from_hf(&config, None).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen3);
    assert_eq!(
        c.head_dim, 128,
        "head_dim is not hidden/heads (64) for Qwen3-0.6B"
    );
    assert!(c.qk_norm);
    assert!(!c.attention_bias);
    assert_eq!(c.sliding_window, None);
}

#[test]
fn architecture_from_model_type_when_architectures_is_missing() {
    let mut config = mistral_7b_v01();
    config.as_object_mut().unwrap().remove("architectures");
    let c = ModelConfig::from_hf(&config, None).unwrap();
    assert_eq!(c.architecture, Architecture::Mistral);
}

#[test]
fn unsupported_architecture_is_named() {
    let mut config = llama31_8b_instruct();
    config["architectures"] = json!(["GPT2LMHeadModel"]);
    let e = ModelConfig::from_hf(&config, None).unwrap_err().to_string();
    assert!(
        e.contains("unsupported model architecture `GPT2LMHeadModel`"),
        "{e}"
    );
    assert!(e.contains("supported: LlamaForCausalLM"), "{e}");
    assert!(e.contains("Qwen3ForCausalLM"), "{e}");
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let mut config = llama31_8b_instruct();
    config["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
    let e = ModelConfig::from_hf(&config, None).unwrap_err().to_string();
    assert!(e.contains("`yarn`"), "{e}");

    config["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let c = ModelConfig::from_hf(&config, None).unwrap();
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
}

#[test]
fn eos_ids_merge_config_and_generation_config() {
    let mut config = llama31_8b_instruct();
    config["eos_token_id"] = json!(128001);
    let generation = json!({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]});
    let c = ModelConfig::from_hf(&config, Some(&generation)).unwrap();
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);

    let generation = json!({"eos_token_id": 7});
    let c = ModelConfig::from_hf(&config, Some(&generation)).unwrap();
    assert_eq!(c.eos_token_ids, vec![128001, 7]);

    config.as_object_mut().unwrap().remove("eos_token_id");
    let c = ModelConfig::from_hf(&config, None).unwrap();
    assert!(c.eos_token_ids.is_empty());
}

#[test]
fn llama3_rope_scaling_is_recovered_from_gguf_freq_factors() {
    let scaling = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let factors = llama3_freq_factors(&scaling, 64, 500000.0);
    // All three bands are present, so the fit is not trivially satisfied.
    assert_eq!(factors[0], 1.0);
    assert_eq!(*factors.last().unwrap(), 32.0);
    assert!(factors.iter().any(|f| *f > 1.0 && *f < 32.0));
    let recovered = llama3_scaling_from_freq_factors(&factors, 64, 500000.0).unwrap();
    assert_eq!(recovered, scaling);

    let mut odd = factors.clone();
    odd[10] = 3.3;
    assert!(llama3_scaling_from_freq_factors(&odd, 64, 500000.0).is_err());
}

// ---------------------------------------------------------------------------------------------
// safetensors

fn ramp(shape: &[usize], offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| offset + (i as f32 * 0.37).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn assert_same(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn some_tensors() -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".to_string(), ramp(&[10, 8], 0.0));
    m.insert(
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        ramp(&[8, 8], 1.0),
    );
    m.insert(
        "model.layers.0.self_attn.q_proj.bias".to_string(),
        ramp(&[8], 2.0),
    );
    m.insert(
        "model.layers.0.mlp.down_proj.weight".to_string(),
        ramp(&[8, 16], 3.0),
    );
    m.insert("model.norm.weight".to_string(), ramp(&[8], 4.0));
    m
}

#[test]
fn sharded_safetensors_load_the_same_tensors_as_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = some_tensors();
    let single = dir.path().join("single");
    std::fs::create_dir(&single).unwrap();
    candle_core::safetensors::save(&tensors, single.join("model.safetensors")).unwrap();

    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(3).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<&str, Tensor> = chunk
            .iter()
            .map(|n| (n.as_str(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, sharded.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.to_string(), json!(file));
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        json!({"metadata": {"total_size": 0}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();

    let one = WeightStore::from_safetensors_dir(&single).unwrap();
    let many = WeightStore::from_safetensors_dir(&sharded).unwrap();
    assert!(matches!(many, WeightStore::Safetensors(_)));
    for (name, t) in &tensors {
        assert!(one.contains(name) && many.contains(name), "{name}");
        let a = one.tensor(name, DType::F32, &Device::Cpu).unwrap();
        let b = many.tensor(name, DType::F32, &Device::Cpu).unwrap();
        assert_same(&a, t);
        assert_same(&b, t);
    }
    assert!(!many.contains("lm_head.weight"));
    assert!(many
        .tensor("lm_head.weight", DType::F32, &Device::Cpu)
        .is_err());
}

#[test]
fn missing_shard_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    testing::write_hf_model_with(
        dir.path(),
        &TinyModelSpec::llama(),
        WriteOptions {
            dtype: DType::F32,
            shards: 2,
        },
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load(
        dir.path().to_str().unwrap(),
        None,
        None,
        true,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("model-00002-of-00002.safetensors"),
        "{e:#}"
    );
}

#[test]
fn bf16_safetensors_load_as_f32_or_stay_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = some_tensors();
    let bf16: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&bf16, &path).unwrap();
    let store = WeightStore::from_safetensors(&[path]).unwrap();
    assert_eq!(store.weight_format(), "bf16");
    assert_eq!(store.compute_format(&LoadOptions::default()), "f32");

    let name = "model.layers.0.self_attn.q_proj";
    let expected = bf16[&format!("{name}.weight")]
        .to_dtype(DType::F32)
        .unwrap();
    match store.linear(name, true, &LoadOptions::default()).unwrap() {
        Linear::Dense { weight, bias } => {
            assert_eq!(weight.dtype(), DType::F32);
            assert_same(&weight, &expected);
            assert_eq!(bias.unwrap().dtype(), DType::F32);
        }
        other => panic!("dense expected, got {other:?}"),
    }
    // Asked for bf16, linears keep the stored bf16 values, on wick's kernels.
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    assert_eq!(store.compute_format(&opts), "bf16");
    match store.linear(name, true, &opts).unwrap() {
        Linear::Bf16 { weight, bias, .. } => {
            let stored: Vec<u16> = expected
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(wick_kernels::bf16_from_f32)
                .collect();
            assert_eq!(weight.to_bf16(), stored);
            assert_eq!(bias.unwrap().dtype(), DType::F32);
        }
        other => panic!("bf16 expected, got {other:?}"),
    }
    let f16 = LoadOptions {
        dtype: DType::F16,
        ..LoadOptions::default()
    };
    match store.linear(name, false, &f16).unwrap() {
        Linear::Dense { weight, .. } => assert_eq!(weight.dtype(), DType::F16),
        other => panic!("dense expected, got {other:?}"),
    }
    let norm = store
        .tensor("model.norm.weight", DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(norm.dtype(), DType::F32);
}

#[test]
fn quantize_at_load_makes_quantized_linears() {
    let mut tensors = HashMap::new();
    let w = ramp(&[32, 256], 0.0);
    tensors.insert("model.layers.0.mlp.up_proj.weight".to_string(), w.clone());
    // 24 is not a multiple of Q8_0's 32-element block: stays dense.
    tensors.insert(
        "model.layers.0.mlp.down_proj.weight".to_string(),
        ramp(&[16, 24], 0.0),
    );
    let store = WeightStore::Tensors(tensors);
    let x = ramp(&[3, 256], 0.5);
    let reference = x.matmul(&w.t().unwrap()).unwrap();

    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Relative to the largest output; a wrong layout would be off by ~100%.
    // All three compute on wick's kernels (candle quantizes, wick repacks).
    for (quantize, name, tol) in [
        (Quantize::Q8_0, "q8_0", 0.01),
        (Quantize::Q4_0, "q4_0", 0.1),
        (Quantize::Q4K, "q4_k", 0.1),
    ] {
        let opts = LoadOptions {
            quantize: Some(quantize),
            ..LoadOptions::default()
        };
        assert_eq!(store.compute_format(&opts), name);
        let a = store
            .linear("model.layers.0.mlp.up_proj", false, &opts)
            .unwrap();
        assert_eq!(a.format_name(), name);
        assert!(matches!(a, Linear::Packed { .. }), "{quantize:?}");
        let y = a.forward(&x).unwrap();
        let err = max_abs_diff(&y, &reference) / scale;
        assert!(err > 0.0 && err < tol, "{quantize:?}: {err}");
    }
    let opts = LoadOptions {
        quantize: Some(Quantize::Q8_0),
        ..LoadOptions::default()
    };
    assert!(matches!(
        store
            .linear("model.layers.0.mlp.down_proj", false, &opts)
            .unwrap(),
        Linear::Dense { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// llama.cpp's `LlamaModel.permute`, written independently of the loader:
/// `w.reshape(n_head, 2, rows/n_head/2, ...).swapaxes(1, 2).reshape(w.shape)`.
fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, 2, rows / n_head / 2, rest))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

#[test]
fn gguf_names_follow_llama_cpp() {
    let cases = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (
            "model.layers.3.self_attn.q_proj.weight",
            "blk.3.attn_q.weight",
        ),
        ("model.layers.3.self_attn.k_proj.bias", "blk.3.attn_k.bias"),
        (
            "model.layers.3.self_attn.v_proj.weight",
            "blk.3.attn_v.weight",
        ),
        (
            "model.layers.3.self_attn.o_proj.weight",
            "blk.3.attn_output.weight",
        ),
        (
            "model.layers.12.self_attn.q_norm.weight",
            "blk.12.attn_q_norm.weight",
        ),
        (
            "model.layers.12.self_attn.k_norm.weight",
            "blk.12.attn_k_norm.weight",
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            "blk.0.ffn_gate.weight",
        ),
        ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
        (
            "model.layers.0.mlp.down_proj.weight",
            "blk.0.ffn_down.weight",
        ),
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_norm.weight",
        ),
        ("rope_freqs.weight", "rope_freqs.weight"),
    ];
    for (hf, gguf) in cases {
        assert_eq!(gguf_tensor_name(hf), gguf, "{hf}");
    }
}

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const HIDDEN: usize = 64;

/// Writes a one-layer attention GGUF: q/k permuted as llama.cpp does for `llama`, stored as
/// `dtype`; biases in f32.
fn write_attention_gguf(path: &Path, arch: &str, dtype: GgmlDType, permute: bool) -> [Tensor; 4] {
    let q = ramp(&[HEADS * HEAD_DIM, HIDDEN], 0.0);
    let k = ramp(&[KV_HEADS * HEAD_DIM, HIDDEN], 10.0);
    let q_bias = ramp(&[HEADS * HEAD_DIM], 20.0);
    let v = ramp(&[KV_HEADS * HEAD_DIM, HIDDEN], 30.0);
    let (sq, sk, sqb) = if permute {
        (
            llama_cpp_permute(&q, HEADS),
            llama_cpp_permute(&k, KV_HEADS),
            llama_cpp_permute(&q_bias, HEADS),
        )
    } else {
        (q.clone(), k.clone(), q_bias.clone())
    };
    let tensors = [
        (
            "blk.0.attn_q.weight",
            QTensor::quantize(&sq, dtype).unwrap(),
        ),
        (
            "blk.0.attn_k.weight",
            QTensor::quantize(&sk, dtype).unwrap(),
        ),
        ("blk.0.attn_v.weight", QTensor::quantize(&v, dtype).unwrap()),
        (
            "blk.0.attn_q.bias",
            QTensor::quantize(&sqb, GgmlDType::F32).unwrap(),
        ),
    ];
    let arch_v = Value::String(arch.to_string());
    let heads = Value::U32(HEADS as u32);
    let kv = Value::U32(KV_HEADS as u32);
    let head_key = format!("{arch}.attention.head_count");
    let kv_key = format!("{arch}.attention.head_count_kv");
    let metadata = [
        ("general.architecture", &arch_v),
        (head_key.as_str(), &heads),
        (kv_key.as_str(), &kv),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut file = File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &refs).unwrap();
    [q, k, q_bias, v]
}

/// What `dtype` storage does to `t` on its own (rows quantize independently of their order).
fn roundtrip(t: &Tensor, dtype: GgmlDType) -> Tensor {
    QTensor::quantize(t, dtype)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

#[test]
fn gguf_llama_qk_permutation_is_undone_for_f32_and_q8_0() {
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attn.gguf");
        let [q, k, q_bias, v] = write_attention_gguf(&path, "llama", dtype, true);
        let (store, content) = WeightStore::from_gguf_file(&path).unwrap();
        assert!(content.metadata.contains_key("general.architecture"));
        assert!(content.tensor_infos.contains_key("blk.0.attn_q.weight"));

        let get = |name: &str| store.tensor(name, DType::F32, &Device::Cpu).unwrap();
        let p = "model.layers.0.self_attn";
        let got_q = get(&format!("{p}.q_proj.weight"));
        assert_same(&got_q, &roundtrip(&q, dtype));
        // The loaded rows really moved: the stored (permuted) order differs from HF's.
        assert!(max_abs_diff(&got_q, &roundtrip(&llama_cpp_permute(&q, HEADS), dtype)) > 0.1);
        assert_same(&get(&format!("{p}.k_proj.weight")), &roundtrip(&k, dtype));
        assert_same(&get(&format!("{p}.q_proj.bias")), &q_bias);
        assert_same(&get(&format!("{p}.v_proj.weight")), &roundtrip(&v, dtype));

        // The linear path keeps Q8_0 quantized and unpermutes it at the byte level.
        let quantized_only = LoadOptions {
            dense_copy_min_rows: None,
            ..LoadOptions::default()
        };
        let linear = store
            .linear(&format!("{p}.q_proj"), true, &quantized_only)
            .unwrap();
        match (&linear, dtype) {
            (Linear::Packed { .. }, GgmlDType::Q8_0) | (Linear::Dense { .. }, GgmlDType::F32) => {}
            _ => panic!("{dtype:?} linear loaded as the wrong kind"),
        }
        let x = ramp(&[2, HIDDEN], 0.3);
        let reference = x
            .matmul(&roundtrip(&q, dtype).t().unwrap())
            .unwrap()
            .broadcast_add(&q_bias)
            .unwrap();
        let err = max_abs_diff(&linear.forward(&x).unwrap(), &reference);
        // Q8_0 matmul quantizes the activations too; a wrong row order would be off by ~O(10).
        assert!(err < 0.1, "{dtype:?}: {err}");
        assert_eq!(
            store.weight_format(),
            if dtype == GgmlDType::F32 {
                "f32"
            } else {
                "q8_0"
            }
        );
    }
}

#[test]
fn gguf_qwen2_rows_are_not_permuted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("attn.gguf");
    let [q, k, _, _] = write_attention_gguf(&path, "qwen2", GgmlDType::F32, false);
    let (store, _) = WeightStore::from_gguf_file(&path).unwrap();
    let p = "model.layers.0.self_attn";
    assert_same(
        &store
            .tensor(&format!("{p}.q_proj.weight"), DType::F32, &Device::Cpu)
            .unwrap(),
        &q,
    );
    assert_same(
        &store
            .tensor(&format!("{p}.k_proj.weight"), DType::F32, &Device::Cpu)
            .unwrap(),
        &k,
    );
}

#[test]
fn gguf_model_loads_like_its_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec::llama();
    let hf = dir.path().join("hf");
    testing::write_hf_model(&hf, &spec).unwrap();
    let gguf = dir.path().join("tiny.gguf");
    testing::write_gguf_model(&gguf, &spec, GgmlDType::F32).unwrap();

    let opts = LoadOptions::default();
    let a = load(hf.to_str().unwrap(), None, None, true, &opts).unwrap();
    let b = load(gguf.to_str().unwrap(), None, None, true, &opts).unwrap();
    let expected = spec.config(testing::tiny_vocab_size());
    assert_eq!(a.config, expected);
    // A GGUF file holds one EOS id; generation_config.json listed two.
    let expected_gguf = ModelConfig {
        eos_token_ids: vec![testing::IM_END_ID],
        ..expected
    };
    assert_eq!(b.config, expected_gguf);
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
    ] {
        let ta = a.weights.tensor(name, DType::F32, &Device::Cpu).unwrap();
        let tb = b.weights.tensor(name, DType::F32, &Device::Cpu).unwrap();
        assert_same(&ta, &tb);
    }
    assert_eq!(
        b.tokenizer.get_vocab_size(true),
        a.tokenizer.get_vocab_size(true)
    );
    assert_eq!(a.eos_token.as_deref(), Some(testing::IM_END));
    assert_eq!(a.bos_token.as_deref(), Some(testing::IM_START));
    assert_eq!(a.chat_template.as_deref(), Some(testing::CHAT_TEMPLATE));
    assert!(b.chat_template.is_some());
}

#[test]
fn gguf_config_reads_llama_cpp_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinyModelSpec {
        tie_word_embeddings: true,
        ..TinyModelSpec::llama()
    };
    testing::write_gguf_model(&path, &spec, GgmlDType::Q8_0).unwrap();
    let (store, content) = WeightStore::from_gguf_file(&path).unwrap();
    let header = wick_model::gguf::Header::read_file(&path).unwrap();
    // wick-model's header reader against candle's, on a file candle wrote: the same tensor
    // table (GGUF stores dimensions innermost first, candle outermost first) and metadata keys.
    assert_eq!(header.tensors.len(), content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let mut dims: Vec<u64> = info.shape.dims().iter().map(|&d| d as u64).collect();
        dims.reverse();
        assert_eq!(header.tensors[name].dims, dims, "{name}");
    }
    let mut keys: Vec<_> = header.metadata.keys().collect();
    let mut candle_keys: Vec<_> = content.metadata.keys().collect();
    keys.sort();
    candle_keys.sort();
    assert_eq!(keys, candle_keys);
    let c = ModelConfig::from_gguf(&header).unwrap();
    let expected = ModelConfig {
        eos_token_ids: vec![testing::IM_END_ID],
        ..spec.config(testing::tiny_vocab_size())
    };
    assert_eq!(c, expected);
    assert!(c.tie_word_embeddings);
    assert!(!store.contains("lm_head.weight"));
    assert!(store.contains("model.embed_tokens.weight"));
}

// ---------------------------------------------------------------------------------------------
// sources

#[test]
fn model_source_classification() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_eq!(
        ModelSource::parse(d, None).unwrap(),
        ModelSource::Dir(dir.path().into())
    );
    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, b"").unwrap();
    assert_eq!(
        ModelSource::parse(gguf.to_str().unwrap(), None).unwrap(),
        ModelSource::Gguf(gguf.clone())
    );
    assert_eq!(
        ModelSource::parse("HuggingFaceTB/SmolLM2-135M-Instruct", Some("v1")).unwrap(),
        ModelSource::Hub {
            repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            revision: "v1".into()
        }
    );
    for missing in [
        "./no/such/model",
        "/no/such/dir",
        "missing-model.gguf",
        "a/b/c",
    ] {
        let e = ModelSource::parse(missing, None).unwrap_err().to_string();
        assert_eq!(e, format!("model path {missing} does not exist"));
    }
}

#[test]
fn unsupported_architecture_fails_at_load() {
    let dir = tempfile::tempdir().unwrap();
    testing::write_hf_model(dir.path(), &TinyModelSpec::llama()).unwrap();
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["architectures"] = json!(["PhiForCausalLM"]);
    config["model_type"] = json!("phi");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let e = load(
        dir.path().to_str().unwrap(),
        None,
        None,
        true,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("unsupported model architecture `PhiForCausalLM`"),
        "{e:#}"
    );
}

#[test]
fn chat_template_json_wins_over_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    testing::write_hf_model(dir.path(), &TinyModelSpec::qwen2()).unwrap();
    let opts = LoadOptions::default();
    std::fs::write(
        dir.path().join("chat_template.json"),
        json!({"chat_template": "{{ messages[0].content }}"}).to_string(),
    )
    .unwrap();
    let m = load(dir.path().to_str().unwrap(), None, None, true, &opts).unwrap();
    assert_eq!(
        m.chat_template.as_deref(),
        Some("{{ messages[0].content }}")
    );
    assert_eq!(m.config.architecture, Architecture::Qwen2);

    // The list form of tokenizer_config's chat_template: the `default` entry is taken.
    std::fs::remove_file(dir.path().join("chat_template.json")).unwrap();
    let tc_path = dir.path().join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc_path).unwrap()).unwrap();
    tc["chat_template"] = json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"}
    ]);
    tc["eos_token"] = json!({"content": "<|endoftext|>", "special": true});
    std::fs::write(&tc_path, tc.to_string()).unwrap();
    let m = load(dir.path().to_str().unwrap(), None, None, true, &opts).unwrap();
    assert_eq!(m.chat_template.as_deref(), Some("DEFAULT"));
    assert_eq!(m.eos_token.as_deref(), Some("<|endoftext|>"));
}

#[test]
fn hub_offline_with_empty_cache_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let e = load(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        None,
        Some(cache.path().to_path_buf()),
        true,
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        format!(
            "model HuggingFaceTB/SmolLM2-135M-Instruct is not in the Hugging Face cache at {} and offline mode is on",
            cache.path().display()
        )
    );
}

#[test]
fn hub_offline_resolves_a_prepared_cache() {
    let cache = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.path().join("models--tiny-org--tiny-llama");
    let snapshot = repo_dir.join("snapshots").join(commit);
    testing::write_hf_model_with(
        &snapshot,
        &TinyModelSpec::llama(),
        WriteOptions {
            dtype: DType::BF16,
            shards: 2,
        },
    )
    .unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();

    let hub_cache = Some(cache.path().to_path_buf());
    let source = ModelSource::parse("tiny-org/tiny-llama", None).unwrap();
    let files = source.resolve(hub_cache.clone(), true).unwrap();
    match &files {
        wick_model::source::ModelFiles::Hf(f) => {
            assert_eq!(f.config, snapshot.join("config.json"));
            assert_eq!(f.safetensors.len(), 2);
            assert!(f.generation_config.is_some());
        }
        other => panic!("{other:?}"),
    }

    let opts = LoadOptions::default();
    let m = load("tiny-org/tiny-llama", None, hub_cache.clone(), true, &opts).unwrap();
    assert_eq!(m.model_id, "tiny-org/tiny-llama");
    assert_eq!(
        m.config,
        TinyModelSpec::llama().config(testing::tiny_vocab_size())
    );
    assert_eq!(m.weights.weight_format(), "bf16");
    // A commit hash works as the revision too (no ref file for it).
    let by_commit = load(
        "tiny-org/tiny-llama",
        Some(commit),
        hub_cache.clone(),
        true,
        &opts,
    )
    .unwrap();
    assert_eq!(by_commit.config, m.config);
    // An unknown branch is not in the cache.
    let e = load("tiny-org/tiny-llama", Some("dev"), hub_cache, true, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not in the Hugging Face cache"), "{e}");
}
