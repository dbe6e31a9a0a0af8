//! wick's CPU kernels at every level this host runs (AVX-512 VNNI, AVX2, scalar) give the model
//! the same logits bit for bit, for each format they compute, so a request's tokens do not
//! depend on which CPU serves it; and those logits stay near the same weights run in f32.
//! wick reads every block format as candle does (candle quantizes with llama.cpp's searches,
//! and dequantizes with its own code).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use wick_backend_candle::kv_cache::KvCache;
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::source;
use wick_backend_candle::step::{SeqSpan, StepInput};
use wick_backend_candle::testing::{
    tiny_vocab_size, write_gguf_model, write_hf_model_with, TinyModelSpec, WriteOptions,
};
use wick_backend_candle::weights::LoadOptions;
use wick_kernels::{format, Format, Level};

/// Logits of every position of two packed sequences.
fn logits(model: &LlamaModel) -> Vec<Vec<f32>> {
    logits_of_rows(model, None)
}

/// Logits of `rows` (default: every position) of two packed sequences.
fn logits_of_rows(model: &LlamaModel, rows: Option<Vec<u32>>) -> Vec<Vec<f32>> {
    let vocab = tiny_vocab_size() as u32;
    let (a, b): (Vec<u32>, Vec<u32>) = (
        (0..13).map(|i| (i * 7 + 3) % vocab).collect(),
        (0..6).map(|i| (i * 11 + 5) % vocab).collect(),
    );
    let mut cache = KvCache::with_kv_heads(model.config(), model.plan().kv_heads.len(), 8, 4);
    let (ta, tb) = ([0u32, 1, 2, 3], [4u32, 5, 6, 7]);
    let step = StepInput {
        tokens: [a.clone(), b.clone()].concat(),
        positions: (0..a.len() as u32).chain(0..b.len() as u32).collect(),
        seqs: vec![
            SeqSpan {
                start: 0,
                len: a.len(),
                context_len: a.len(),
                block_table: &ta,
                prompt: true,
            },
            SeqSpan {
                start: a.len(),
                len: b.len(),
                context_len: b.len(),
                block_table: &tb,
                prompt: true,
            },
        ],
        logit_rows: rows.unwrap_or_else(|| (0..(a.len() + b.len()) as u32).collect()),
    };
    model.forward(&step, &mut cache).unwrap().to_vec2().unwrap()
}

/// A model's logits (see [`logits`]) and where each of its weight formats computes.
type Run = (Vec<Vec<f32>>, std::collections::BTreeMap<String, String>);

/// Loads the model at `path` under `opts` and runs it.
fn run(path: &std::path::Path, opts: LoadOptions) -> Run {
    let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
    let model = LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap();
    (logits(&model), model.kernels())
}

/// The model at `path` at every level this host runs: `format` computes on wick at that level,
/// and every level gives the first one's logits bit for bit. Returns the first run.
fn runs_agree(path: &std::path::Path, format: &str, opts: LoadOptions) -> Run {
    let levels = Level::supported();
    let runs: Vec<Run> = levels
        .iter()
        .map(|&kernel_level| {
            run(
                path,
                LoadOptions {
                    kernel_level,
                    ..opts.clone()
                },
            )
        })
        .collect();
    for (level, (logits, kernels)) in levels.iter().zip(&runs) {
        assert_eq!(kernels[format], format!("wick {level}"), "{kernels:?}");
        let same = logits
            .iter()
            .flatten()
            .zip(runs[0].0.iter().flatten())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{format}: {level} differs from {}", levels[0]);
    }
    runs.into_iter().next().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// A Llama spec small enough for 32-element blocks.
fn small_spec() -> TinyModelSpec {
    TinyModelSpec {
        hidden_size: 64,
        intermediate_size: 160,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        ..TinyModelSpec::llama()
    }
}

#[test]
fn every_kernel_level_gives_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let small = small_spec();
    // The K formats' super-blocks are 256 wide.
    let wide = TinyModelSpec {
        hidden_size: 256,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        ..TinyModelSpec::llama()
    };
    let levels = Level::supported();
    eprintln!("levels on this host: {levels:?}");
    for (dtype, name, spec) in [
        (GgmlDType::Q8_0, "q8_0", &small),
        (GgmlDType::Q4_0, "q4_0", &small),
        (GgmlDType::Q4_1, "q4_1", &small),
        (GgmlDType::Q5_0, "q5_0", &small),
        (GgmlDType::Q5_1, "q5_1", &small),
        (GgmlDType::Q4K, "q4_k", &wide),
        (GgmlDType::Q5K, "q5_k", &wide),
        (GgmlDType::Q6K, "q6_k", &wide),
    ] {
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf_model(&path, spec, dtype).unwrap();
        let (logits, _) = runs_agree(&path, name, LoadOptions::default());
        let (f32_logits, _) = run(
            &path,
            LoadOptions {
                dequantize: true,
                ..LoadOptions::default()
            },
        );
        let worst = max_abs_diff(&logits, &f32_logits);
        let scale = f32_logits
            .iter()
            .flatten()
            .fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{name}: max |Δlogit| vs f32 {worst:.2e} (logits up to {scale:.2})");
        // 8-bit activations move these logits by a few percent of their range; a wrong layout
        // or scale moves them by their whole range.
        assert!(worst < 0.1 * scale, "{name}: max |Δlogit| vs f32 {worst}");
    }
}

#[test]
fn wick_reads_ggml_blocks_as_candle_does() {
    let (n, k) = (21, 768);
    let values: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * if i % 61 == 3 { 8.0 } else { 1.0 })
        .collect();
    let w = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
    for (dtype, format) in [
        (GgmlDType::Q8_0, Format::Q8_0),
        (GgmlDType::Q4_0, Format::Q4_0),
        (GgmlDType::Q4_1, Format::Q4_1),
        (GgmlDType::Q5_0, Format::Q5_0),
        (GgmlDType::Q5_1, Format::Q5_1),
        (GgmlDType::Q4K, Format::Q4K),
        (GgmlDType::Q5K, Format::Q5K),
        (GgmlDType::Q6K, Format::Q6K),
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let theirs: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours = format::dequantize(format, &q.data().unwrap(), n, k);
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0f32, f32::max);
        // The same products, perhaps associated differently: a rounding or two.
        assert!(worst < 1e-5, "{format:?}: relative difference {worst}");
    }
}

#[test]
fn bf16_checkpoints_compute_in_bf16_alike_at_every_level_and_as_f32_does() {
    let dir = tempfile::tempdir().unwrap();
    let options = WriteOptions {
        dtype: DType::BF16,
        shards: 1,
    };
    write_hf_model_with(dir.path(), &small_spec(), options).unwrap();
    let bf16 = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    let (logits, _) = runs_agree(dir.path(), "bf16", bf16);
    // The same bf16 values widened to f32 on candle's f32 path: only the order of the sums
    // differs.
    let (f32_logits, kernels) = run(dir.path(), LoadOptions::default());
    assert!(kernels.contains_key("f32"), "{kernels:?}");
    let worst = max_abs_diff(&logits, &f32_logits);
    eprintln!("bf16 kernels vs f32: max |Δlogit| {worst:.2e}");
    assert!(worst < 1e-4, "bf16 vs f32: max |Δlogit| {worst}");
}

/// A step that asks for the logits of a few rows (a prompt's last position) skips the last
/// layer's o_proj and MLP for the others: the rows it returns are those of the whole step, bit
/// for bit, for packed and bf16 weights alike.
#[test]
fn fewer_logit_rows_give_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let packed = dir.path().join("q4_0.gguf");
    write_gguf_model(&packed, &small_spec(), GgmlDType::Q4_0).unwrap();
    let bf16 = dir.path().join("bf16");
    let options = WriteOptions {
        dtype: DType::BF16,
        shards: 1,
    };
    write_hf_model_with(&bf16, &small_spec(), options).unwrap();
    let bf16_opts = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    for (path, opts) in [(&packed, LoadOptions::default()), (&bf16, bf16_opts)] {
        let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
        let model = LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap();
        let kernels = model.kernels();
        assert!(
            kernels.values().all(|k| k.starts_with("wick")),
            "{kernels:?}"
        );
        let all = logits_of_rows(&model, None);
        for rows in [vec![12, 18], vec![5], vec![0, 13, 14]] {
            let some = logits_of_rows(&model, Some(rows.clone()));
            assert_eq!(some.len(), rows.len());
            for (got, &r) in some.iter().zip(&rows) {
                let want = &all[r as usize];
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{}: row {r} differs", path.display());
            }
        }
        assert!(logits_of_rows(&model, Some(vec![])).is_empty());
    }
}
