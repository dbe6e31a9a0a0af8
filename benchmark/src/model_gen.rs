//! `wick-bench make-model`: a random-weight GGUF of a real model's shape, for measuring speed
//! on model sizes people deploy (no model hub is needed). The tokenizer and chat template are
//! copied from a GGUF given on the command line (the default model's), so wick and llama.cpp's
//! `llama-server` both load the file and tokenize alike. Weights are normal with std 0.02, which
//! keeps activations and logits in a sane range; the text it writes is noise.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use rayon::prelude::*;

#[derive(Args, Debug)]
pub struct MakeModelArgs {
    /// The shape to build.
    #[arg(long, value_enum, default_value_t = Shape::Llama3_2_1b)]
    pub shape: Shape,
    /// Linear-layer (and embedding) format: q4_0, q4_1, q8_0, q4_k, q6_k, bf16, or q4_k_m (llama.cpp's
    /// mix: Q6_K for the embedding/output and for attn_v and ffn_down in the first and last
    /// eighth of the layers and every third between, Q4_K elsewhere).
    #[arg(long, default_value = "q4_0")]
    pub format: String,
    /// A GGUF whose tokenizer and chat template the model takes (e.g. the default SmolLM2).
    #[arg(long)]
    pub tokenizer_from: PathBuf,
    /// Where to write the model.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Positions the model declares (`llama.context_length`); default: the real model's (Llama
    /// 3.2: 131072, SmolLM2-135M: 8192). A longer one lets a SmolLM2-shaped model measure
    /// decode at depths past 8192.
    #[arg(long)]
    pub context: Option<usize>,
}

/// Named real shapes (hidden, layers, heads, KV heads, FFN, rope theta).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shape {
    /// Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192.
    #[value(name = "llama-3.2-1b")]
    Llama3_2_1b,
    /// Llama-3.2-3B: hidden 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192.
    #[value(name = "llama-3.2-3b")]
    Llama3_2_3b,
    /// SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, FFN 1536.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

struct Dims {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    rope_theta: f32,
    context: usize,
}

impl Shape {
    fn dims(self) -> Dims {
        match self {
            Shape::Llama3_2_1b => Dims {
                hidden: 2048,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                ffn: 8192,
                rope_theta: 500_000.0,
                context: 131_072,
            },
            Shape::Llama3_2_3b => Dims {
                hidden: 3072,
                layers: 28,
                heads: 24,
                kv_heads: 8,
                ffn: 8192,
                rope_theta: 500_000.0,
                context: 131_072,
            },
            Shape::Smollm2_135m => Dims {
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                ffn: 1536,
                rope_theta: 100_000.0,
                context: 8192,
            },
        }
    }
}

/// Which tensors of a model get which type.
#[derive(Debug, Clone, Copy)]
enum Mix {
    /// Every linear and the embedding in one type.
    All(GgmlDType),
    /// llama.cpp's Q4_K_M.
    Q4KM,
}

impl Mix {
    fn parse(name: &str) -> anyhow::Result<Mix> {
        Ok(Mix::All(match name {
            "q4_0" => GgmlDType::Q4_0,
            "q4_1" => GgmlDType::Q4_1,
            "q8_0" => GgmlDType::Q8_0,
            "q4_k" | "q4k" => GgmlDType::Q4K,
            "q6_k" | "q6k" => GgmlDType::Q6K,
            "bf16" => GgmlDType::BF16,
            "q4_k_m" => return Ok(Mix::Q4KM),
            other => anyhow::bail!(
                "unknown format {other:?} (q4_0, q4_1, q8_0, q4_k, q6_k, q4_k_m, bf16)"
            ),
        }))
    }

    /// The type of tensor `name` (`token_embd`, `attn_v`, ...) of layer `layer` of `layers`.
    fn dtype(self, name: &str, layer: usize, layers: usize) -> GgmlDType {
        match self {
            Mix::All(t) => t,
            Mix::Q4KM => {
                // llama.cpp's `use_more_bits`.
                let more =
                    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;
                match name {
                    "token_embd" => GgmlDType::Q6K,
                    "attn_v" | "ffn_down" if more => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            }
        }
    }
}

/// `rows × cols` approximately normal values with std `std`, from a counter-based hash so the
/// rows fill in parallel and the result depends only on the seed.
fn normal(rows: usize, cols: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; rows * cols];
    v.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let mut s = seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(r as u64 + 1);
        let mut next = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
        };
        // The sum of four uniforms: mean 2, variance 1/3.
        let scale = std * 3f32.sqrt();
        for x in row.iter_mut() {
            *x = (next() + next() + next() + next() - 2.0) * scale;
        }
    });
    v
}

pub fn run(args: MakeModelArgs) -> anyhow::Result<()> {
    let mix = Mix::parse(&args.format)?;
    let d = args.shape.dims();
    let head_dim = d.hidden / d.heads;
    let mut source = File::open(&args.tokenizer_from)
        .with_context(|| format!("opening {}", args.tokenizer_from.display()))?;
    let content = gguf_file::Content::read(&mut source)
        .with_context(|| format!("reading {}", args.tokenizer_from.display()))?;
    let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => anyhow::bail!(
            "{} has no tokenizer.ggml.tokens",
            args.tokenizer_from.display()
        ),
    };
    let u32v = |v: usize| Value::U32(v as u32);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!("random {:?} {}", args.shape, args.format)),
        ),
        (
            "llama.context_length".into(),
            u32v(args.context.unwrap_or(d.context)),
        ),
        ("llama.embedding_length".into(), u32v(d.hidden)),
        ("llama.block_count".into(), u32v(d.layers)),
        ("llama.feed_forward_length".into(), u32v(d.ffn)),
        ("llama.attention.head_count".into(), u32v(d.heads)),
        ("llama.attention.head_count_kv".into(), u32v(d.kv_heads)),
        ("llama.rope.dimension_count".into(), u32v(head_dim)),
        ("llama.rope.freq_base".into(), Value::F32(d.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u32v(vocab)),
    ];
    for (key, value) in &content.metadata {
        if key.starts_with("tokenizer.") {
            metadata.push((key.clone(), value.clone()));
        }
    }

    let quantize = |name: &str,
                    layer: usize,
                    rows: usize,
                    cols: usize,
                    seed: u64|
     -> anyhow::Result<(String, QTensor)> {
        let data = normal(rows, cols, 0.02, seed);
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
        let dtype = mix.dtype(name, layer, d.layers);
        let full = match name {
            "token_embd" => "token_embd.weight".to_string(),
            _ => format!("blk.{layer}.{name}.weight"),
        };
        Ok((full, QTensor::quantize(&t, dtype)?))
    };
    let ones = |name: &str, len: usize| -> anyhow::Result<(String, QTensor)> {
        let t = Tensor::ones(len, candle_core::DType::F32, &Device::Cpu)?;
        Ok((name.to_string(), QTensor::quantize(&t, GgmlDType::F32)?))
    };
    let mut seed = args.seed.wrapping_mul(1000);
    let mut next_seed = || {
        seed += 1;
        seed
    };
    let mut tensors = vec![
        quantize("token_embd", 0, vocab, d.hidden, next_seed())?,
        ones("output_norm.weight", d.hidden)?,
    ];
    let (q, kv) = (d.heads * head_dim, d.kv_heads * head_dim);
    for l in 0..d.layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push(ones(&n("attn_norm"), d.hidden)?);
        tensors.push(ones(&n("ffn_norm"), d.hidden)?);
        tensors.push(quantize("attn_q", l, q, d.hidden, next_seed())?);
        tensors.push(quantize("attn_k", l, kv, d.hidden, next_seed())?);
        tensors.push(quantize("attn_v", l, kv, d.hidden, next_seed())?);
        tensors.push(quantize("attn_output", l, d.hidden, q, next_seed())?);
        tensors.push(quantize("ffn_gate", l, d.ffn, d.hidden, next_seed())?);
        tensors.push(quantize("ffn_up", l, d.ffn, d.hidden, next_seed())?);
        tensors.push(quantize("ffn_down", l, d.hidden, d.ffn, next_seed())?);
        eprint!("\rlayer {}/{}", l + 1, d.layers);
    }
    eprintln!();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = BufWriter::new(
        File::create(&args.output)
            .with_context(|| format!("creating {}", args.output.display()))?,
    );
    gguf_file::write(&mut out, &meta, &refs)?;
    let params: usize = tensors.iter().map(|(_, t)| t.shape().elem_count()).sum();
    eprintln!(
        "wrote {} ({:.2} B parameters, {})",
        args.output.display(),
        params as f64 / 1e9,
        args.format
    );
    Ok(())
}
