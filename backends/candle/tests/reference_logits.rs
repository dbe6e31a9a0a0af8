//! Invariant 2: the packed/paged decoder's logits match candle-transformers' own model code on
//! the same (tiny, random) weights; and invariant 1 at the logits level: packing, chunking and
//! decoding token by token do not change a sequence's logits.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, qwen2, qwen3};
use wick_backend_candle::kv_cache::KvCache;
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::step::{SeqSpan, StepInput};
use wick_backend_candle::weights::{LoadOptions, WeightStore};
use wick_kernels::KvDtype;
use wick_model::config::{Architecture, ModelConfig, RopeScaling};

/// Max abs logit difference allowed against the reference (f32 throughout). Only the order of
/// float sums differs, and candle's GEMM picks its microkernel (so its summation order) by CPU:
/// the SmolLM2 shape measured 5e-5 on an AMD Zen 4 host and 1.4e-4 on an Intel Xeon with
/// AVX-512 FP16. A wrong rope, norm or mask moves logits by 1e-2 or more.
const REF_TOL: f32 = 3e-4;
/// Max abs logit difference allowed between two runs of our own model (packing, chunking).
const SELF_TOL: f32 = 1e-5;
const NUM_BLOCKS: usize = 64;

/// splitmix64: deterministic values without depending on any library's seeding.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab) as u32).collect()
    }
}

fn config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: false,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// Random weights with Hugging Face names, scaled so activations stay O(1) and attention is
/// far from uniform (so masking and positions matter).
fn random_weights(c: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng(seed);
    let mut map = HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * rng.uniform()).collect();
        map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let s_h = 1.0 / (h as f32).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        1.0,
        0.0,
    );
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[h], 0.2, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.2,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[q_out, h],
            3.0 * s_h,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv_out, h],
            3.0 * s_h,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv_out, h],
            s_h,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q_out],
            1.0 / (q_out as f32).sqrt(),
            0.0,
        );
        if c.attention_bias {
            put(format!("{p}.self_attn.q_proj.bias"), &[q_out], 0.5, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), &[kv_out], 0.5, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), &[kv_out], 0.5, 0.0);
        }
        if c.qk_norm {
            put(format!("{p}.self_attn.q_norm.weight"), &[hd], 0.5, 1.5);
            put(format!("{p}.self_attn.k_norm.weight"), &[hd], 0.5, 1.5);
        }
        let i_sz = c.intermediate_size;
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[i_sz, h],
            2.0 * s_h,
            0.0,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            &[i_sz, h],
            2.0 * s_h,
            0.0,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[h, i_sz],
            1.0 / (i_sz as f32).sqrt(),
            0.0,
        );
    }
    put("model.norm.weight".into(), &[h], 0.2, 1.0);
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), &[c.vocab_size, h], 2.0 * s_h, 0.0);
    }
    map
}

fn load(c: &ModelConfig, weights: &HashMap<String, Tensor>) -> LlamaModel {
    let store = WeightStore::Tensors(weights.clone());
    LlamaModel::load(c, &store, &LoadOptions::default()).unwrap()
}

/// candle-transformers' implementation of the same architecture: the independent reference.
enum Reference {
    Llama(llama::Llama, llama::Config),
    Mistral(mistral::Model),
    Qwen2(qwen2::ModelForCausalLM),
    Qwen3(qwen3::ModelForCausalLM),
}

impl Reference {
    fn new(c: &ModelConfig, weights: &HashMap<String, Tensor>) -> Self {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        match c.architecture {
            Architecture::Llama => {
                assert_eq!(c.head_dim * c.num_attention_heads, c.hidden_size);
                let rope_scaling = c.rope_scaling.as_ref().map(|s| match s {
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => llama::Llama3RopeConfig {
                        factor: *factor,
                        low_freq_factor: *low_freq_factor,
                        high_freq_factor: *high_freq_factor,
                        original_max_position_embeddings: *original_max_position_embeddings,
                        rope_type: llama::Llama3RopeType::Llama3,
                    },
                    RopeScaling::Linear { .. } => panic!("no reference for linear scaling"),
                });
                let cfg = llama::Config {
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    vocab_size: c.vocab_size,
                    num_hidden_layers: c.num_hidden_layers,
                    num_attention_heads: c.num_attention_heads,
                    num_key_value_heads: c.num_key_value_heads,
                    use_flash_attn: false,
                    rms_norm_eps: c.rms_norm_eps,
                    rope_theta: c.rope_theta,
                    bos_token_id: None,
                    eos_token_id: None,
                    rope_scaling,
                    max_position_embeddings: c.max_position_embeddings,
                    tie_word_embeddings: c.tie_word_embeddings,
                };
                Reference::Llama(llama::Llama::load(vb, &cfg).unwrap(), cfg)
            }
            Architecture::Mistral => {
                let cfg = mistral::Config {
                    vocab_size: c.vocab_size,
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    num_hidden_layers: c.num_hidden_layers,
                    num_attention_heads: c.num_attention_heads,
                    head_dim: Some(c.head_dim),
                    num_key_value_heads: c.num_key_value_heads,
                    hidden_act: candle_nn::Activation::Silu,
                    max_position_embeddings: c.max_position_embeddings,
                    rms_norm_eps: c.rms_norm_eps,
                    rope_theta: c.rope_theta as f64,
                    // candle's mask lets a token see `sliding_window + 1` positions (itself and
                    // `sliding_window` before it); ours, like current transformers, `window`.
                    sliding_window: c.sliding_window.map(|w| w - 1),
                    use_flash_attn: false,
                };
                Reference::Mistral(mistral::Model::new(&cfg, vb).unwrap())
            }
            Architecture::Qwen2 => {
                assert_eq!(c.head_dim * c.num_attention_heads, c.hidden_size);
                let cfg = qwen2::Config {
                    vocab_size: c.vocab_size,
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    num_hidden_layers: c.num_hidden_layers,
                    num_attention_heads: c.num_attention_heads,
                    num_key_value_heads: c.num_key_value_heads,
                    max_position_embeddings: c.max_position_embeddings,
                    // candle's Qwen2 always applies this window to its mask: make it a no-op.
                    sliding_window: c.max_position_embeddings,
                    max_window_layers: c.num_hidden_layers,
                    tie_word_embeddings: c.tie_word_embeddings,
                    rope_theta: c.rope_theta as f64,
                    rms_norm_eps: c.rms_norm_eps,
                    use_sliding_window: false,
                    hidden_act: candle_nn::Activation::Silu,
                };
                Reference::Qwen2(qwen2::ModelForCausalLM::new(&cfg, vb).unwrap())
            }
            Architecture::Qwen3 => {
                let cfg = qwen3::Config {
                    vocab_size: c.vocab_size,
                    hidden_size: c.hidden_size,
                    intermediate_size: c.intermediate_size,
                    num_hidden_layers: c.num_hidden_layers,
                    num_attention_heads: c.num_attention_heads,
                    head_dim: c.head_dim,
                    attention_bias: c.attention_bias,
                    num_key_value_heads: c.num_key_value_heads,
                    max_position_embeddings: c.max_position_embeddings,
                    sliding_window: None,
                    max_window_layers: c.num_hidden_layers,
                    tie_word_embeddings: c.tie_word_embeddings,
                    rope_theta: c.rope_theta as f64,
                    rms_norm_eps: c.rms_norm_eps,
                    use_sliding_window: false,
                    hidden_act: candle_nn::Activation::Silu,
                };
                Reference::Qwen3(qwen3::ModelForCausalLM::new(&cfg, vb).unwrap())
            }
        }
    }

    /// Logits of the last position after running the whole sequence from position 0.
    fn last_logits(&mut self, tokens: &[u32]) -> Vec<f32> {
        let ids = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match self {
            Reference::Llama(m, cfg) => {
                let mut cache = llama::Cache::new(false, DType::F32, cfg, &Device::Cpu).unwrap();
                m.forward(&ids, 0, &mut cache)
            }
            Reference::Mistral(m) => {
                m.clear_kv_cache();
                m.forward(&ids, 0)
            }
            Reference::Qwen2(m) => {
                m.clear_kv_cache();
                m.forward(&ids, 0)
            }
            Reference::Qwen3(m) => {
                m.clear_kv_cache();
                m.forward(&ids, 0)
            }
        };
        logits.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Logits of every position: each prefix run from scratch, so nothing depends on the
    /// reference's own KV cache.
    fn all_logits(&mut self, tokens: &[u32]) -> Vec<Vec<f32>> {
        (1..=tokens.len())
            .map(|n| self.last_logits(&tokens[..n]))
            .collect()
    }
}

/// A sequence's place in the paged cache.
struct Seq {
    block_table: Vec<u32>,
    /// Tokens already in the cache.
    cached: usize,
}

/// Hands out blocks in a shuffled order, so block tables are neither contiguous nor sorted.
struct BlockPool(Vec<u32>);

impl BlockPool {
    fn new(seed: u64) -> Self {
        let mut blocks: Vec<u32> = (0..NUM_BLOCKS as u32).collect();
        Rng(seed).shuffle(&mut blocks);
        Self(blocks)
    }

    fn seq(&mut self, max_tokens: usize, block_size: usize) -> Seq {
        let n = max_tokens.div_ceil(block_size);
        let at = self.0.len() - n;
        Seq {
            block_table: self.0.split_off(at),
            cached: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Want {
    All,
    Last,
}

/// Runs one packed step where each part is a sequence with its new tokens; returns, per part,
/// the logits of the rows it wanted.
fn step(
    model: &LlamaModel,
    cache: &mut KvCache,
    parts: &mut [(&mut Seq, &[u32], Want)],
) -> Vec<Vec<Vec<f32>>> {
    let (mut tokens, mut positions, mut logit_rows) = (vec![], vec![], vec![]);
    let mut spans = vec![];
    let mut rows_per_part = vec![];
    for (seq, new, want) in parts.iter() {
        let start = tokens.len();
        for (i, &t) in new.iter().enumerate() {
            let p = seq.cached + i;
            tokens.push(t);
            positions.push(p as u32);
        }
        let rows: Vec<u32> = match want {
            Want::All => (start..start + new.len()).map(|r| r as u32).collect(),
            Want::Last => vec![(start + new.len() - 1) as u32],
        };
        rows_per_part.push(rows.len());
        logit_rows.extend(rows);
        spans.push(SeqSpan {
            start,
            len: new.len(),
            context_len: seq.cached + new.len(),
            block_table: &seq.block_table,
            prompt: new.len() > 1,
        });
    }
    let input = StepInput {
        tokens,
        positions,
        seqs: spans,
        logit_rows,
    };
    let logits = model.forward(&input, cache).unwrap();
    assert_eq!(
        logits.dims(),
        &[input.logit_rows.len(), model.config().vocab_size]
    );
    drop(input);
    for (seq, new, _) in parts.iter_mut() {
        seq.cached += new.len();
    }
    let mut rows = logits.to_vec2::<f32>().unwrap().into_iter();
    rows_per_part
        .into_iter()
        .map(|n| rows.by_ref().take(n).collect())
        .collect()
}

/// Prefills `prompt` alone in a fresh cache and returns the logits of every position.
fn prefill_alone(
    model: &LlamaModel,
    prompt: &[u32],
    block_size: usize,
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut cache = f32_cache(model.config(), NUM_BLOCKS, block_size);
    let mut seq = BlockPool::new(seed).seq(prompt.len(), block_size);
    step(model, &mut cache, &mut [(&mut seq, prompt, Want::All)]).remove(0)
}

/// A cache of f32 values: these tests hold the model's arithmetic to the f32 reference, which
/// a 16-bit cache's rounding would blur (that is measured on its own, below).
fn f32_cache(c: &ModelConfig, num_blocks: usize, block_size: usize) -> KvCache {
    KvCache::with_dtype(
        c,
        c.num_key_value_heads,
        num_blocks,
        block_size,
        KvDtype::F32,
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_rows_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

/// Prefills prompts of several lengths and compares every position with the reference.
fn assert_matches_reference(c: &ModelConfig, block_size: usize, seed: u64) -> f32 {
    let weights = random_weights(c, seed);
    let model = load(c, &weights);
    let mut reference = Reference::new(c, &weights);
    let mut rng = Rng(seed ^ 0xABCD);
    let mut worst = 0f32;
    for len in [1, 7, 33] {
        let prompt = rng.tokens(len, c.vocab_size);
        let ours = prefill_alone(&model, &prompt, block_size, seed + len as u64);
        let want = reference.all_logits(&prompt);
        let diff = max_rows_diff(&ours, &want);
        eprintln!("{:?} len {len}: max |Δlogit| = {diff:.2e}", c.architecture);
        assert!(diff <= REF_TOL, "len {len}: max diff {diff}");
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn llama_matches_reference() {
    assert_matches_reference(&config(Architecture::Llama), 4, 1);
}

#[test]
fn llama3_rope_scaling_and_tied_embeddings_match_reference() {
    let mut c = config(Architecture::Llama);
    c.tie_word_embeddings = true;
    c.rope_theta = 500_000.0;
    // Wavelengths of this head_dim fall on all three sides of 32/4 and 32/1.
    c.rope_scaling = Some(RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 32,
    });
    assert_matches_reference(&c, 16, 2);
}

#[test]
fn mistral_sliding_window_matches_reference() {
    let mut c = config(Architecture::Mistral);
    c.sliding_window = Some(8);
    assert_matches_reference(&c, 4, 3);

    // The window must matter on a prompt longer than it, or the comparison above proves nothing.
    let weights = random_weights(&c, 3);
    let prompt = Rng(33).tokens(33, c.vocab_size);
    let windowed = prefill_alone(&load(&c, &weights), &prompt, 4, 5);
    c.sliding_window = None;
    let full = prefill_alone(&load(&c, &weights), &prompt, 4, 5);
    assert!(max_abs_diff(&windowed[7], &full[7]) <= SELF_TOL);
    assert!(max_abs_diff(&windowed[32], &full[32]) > 1e-2);
}

#[test]
fn qwen2_qkv_bias_matches_reference() {
    let mut c = config(Architecture::Qwen2);
    c.attention_bias = true;
    c.rope_theta = 1_000_000.0;
    assert_matches_reference(&c, 4, 4);
}

#[test]
fn qwen3_qk_norm_matches_reference() {
    let mut c = config(Architecture::Qwen3);
    c.qk_norm = true;
    // Explicit head_dim: q is 4 x 32 = 128 wide while hidden is 64.
    c.head_dim = 32;
    c.tie_word_embeddings = true;
    assert_matches_reference(&c, 16, 5);
}

#[test]
fn prompt_longer_than_a_query_tile_matches_reference() {
    // 150 tokens span ten tiles of the chunk kernel; with a window, later tiles' keys start
    // inside a block and the tiles' tokens see different first positions.
    for (arch, window) in [
        (Architecture::Mistral, Some(8)),
        (Architecture::Llama, None),
    ] {
        let mut c = config(arch);
        c.sliding_window = window;
        c.max_position_embeddings = 256;
        let weights = random_weights(&c, 13);
        let model = load(&c, &weights);
        let mut reference = Reference::new(&c, &weights);
        let prompt = Rng(1313).tokens(150, c.vocab_size);
        let ours = prefill_alone(&model, &prompt, 16, 14);
        let mut worst = 0f32;
        for pos in [0, 9, 127, 128, 129, 149] {
            let want = reference.last_logits(&prompt[..=pos]);
            worst = worst.max(max_abs_diff(&ours[pos], &want));
        }
        eprintln!("{arch:?} 150-token prompt: max |Δlogit| = {worst:.2e}");
        assert!(worst <= REF_TOL, "{arch:?}: {worst}");
    }
}

#[test]
fn packed_sequences_match_each_alone() {
    let mut c = config(Architecture::Mistral);
    c.sliding_window = Some(12);
    let weights = random_weights(&c, 6);
    let model = load(&c, &weights);
    let mut rng = Rng(66);
    let prompts: Vec<Vec<u32>> = [1, 7, 33, 5, 16]
        .iter()
        .map(|&n| rng.tokens(n, c.vocab_size))
        .collect();
    let alone: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| prefill_alone(&model, p, 4, 100 + i as u64))
        .collect();

    let mut cache = f32_cache(&c, NUM_BLOCKS, 4);
    let mut pool = BlockPool::new(7);
    let mut seqs: Vec<Seq> = prompts.iter().map(|p| pool.seq(p.len(), 4)).collect();
    let mut parts: Vec<_> = seqs
        .iter_mut()
        .zip(&prompts)
        .map(|(s, p)| (s, p.as_slice(), Want::All))
        .collect();
    let packed = step(&model, &mut cache, &mut parts);
    let mut worst = 0f32;
    for (i, (p, a)) in packed.iter().zip(&alone).enumerate() {
        let diff = max_rows_diff(p, a);
        assert!(diff <= SELF_TOL, "sequence {i}: packed vs alone {diff}");
        worst = worst.max(diff);
    }
    eprintln!("packed vs alone: max |Δlogit| = {worst:.2e}");
}

#[test]
fn prefill_then_batched_decode_matches_full_sequence_reference() {
    // Two sequences decode side by side, past the sliding window, in shuffled blocks of 4.
    let mut c = config(Architecture::Mistral);
    c.sliding_window = Some(6);
    let weights = random_weights(&c, 8);
    let model = load(&c, &weights);
    let mut reference = Reference::new(&c, &weights);
    let mut rng = Rng(88);
    // The 18-token prompt takes the chunk kernel, the 5-token one and the decodes the loop.
    let full: Vec<Vec<u32>> = [(5, 20), (18, 9)]
        .iter()
        .map(|&(prompt, decode)| rng.tokens(prompt + decode, c.vocab_size))
        .collect();
    let prompt_lens = [5, 18];

    let mut cache = f32_cache(&c, NUM_BLOCKS, 4);
    let mut pool = BlockPool::new(9);
    let mut a = pool.seq(full[0].len(), 4);
    let mut b = pool.seq(full[1].len(), 4);
    let mut got: Vec<Vec<Vec<f32>>> = step(
        &model,
        &mut cache,
        &mut [
            (&mut a, &full[0][..prompt_lens[0]], Want::All),
            (&mut b, &full[1][..prompt_lens[1]], Want::All),
        ],
    );
    loop {
        let (na, nb) = (a.cached, b.cached);
        let mut parts = vec![];
        if na < full[0].len() {
            parts.push((&mut a, &full[0][na..na + 1], Want::Last));
        }
        if nb < full[1].len() {
            parts.push((&mut b, &full[1][nb..nb + 1], Want::Last));
        }
        if parts.is_empty() {
            break;
        }
        let mut out = step(&model, &mut cache, &mut parts).into_iter();
        if na < full[0].len() {
            got[0].extend(out.next().unwrap());
        }
        if nb < full[1].len() {
            got[1].extend(out.next().unwrap());
        }
    }
    let mut worst = 0f32;
    for (ours, tokens) in got.iter().zip(&full) {
        let diff = max_rows_diff(ours, &reference.all_logits(tokens));
        assert!(diff <= REF_TOL, "decode vs reference: {diff}");
        worst = worst.max(diff);
    }
    eprintln!("prefill + decode vs reference: max |Δlogit| = {worst:.2e}");
}

#[test]
fn chunked_prefill_matches_single_prefill() {
    let mut c = config(Architecture::Qwen2);
    c.attention_bias = true;
    let weights = random_weights(&c, 10);
    let model = load(&c, &weights);
    let mut rng = Rng(1010);
    let prompt = rng.tokens(33, c.vocab_size);
    let other = rng.tokens(4, c.vocab_size);

    let mut cache = f32_cache(&c, NUM_BLOCKS, 4);
    let mut pool = BlockPool::new(11);
    let mut once = pool.seq(prompt.len(), 4);
    let single = step(&model, &mut cache, &mut [(&mut once, &prompt, Want::Last)]).remove(0);

    // Three chunks of different sizes, each packed with a decode step of another sequence,
    // the later ones over a cached prefix.
    let mut chunked = pool.seq(prompt.len(), 4);
    let mut neighbour = pool.seq(other.len(), 4);
    let mut last = vec![];
    let chunks = [0..5, 5..25, 25..33];
    for (i, range) in chunks.into_iter().enumerate() {
        let out = step(
            &model,
            &mut cache,
            &mut [
                (&mut neighbour, &other[i..i + 1], Want::Last),
                (&mut chunked, &prompt[range], Want::Last),
            ],
        );
        last = out[1][0].clone();
    }
    let diff = max_abs_diff(&last, &single[0]);
    eprintln!("chunked vs single prefill: max |Δlogit| = {diff:.2e}");
    assert!(diff <= SELF_TOL, "chunked vs single: {diff}");
    let ref_diff = max_abs_diff(&last, &Reference::new(&c, &weights).last_logits(&prompt));
    assert!(ref_diff <= REF_TOL, "chunked vs reference: {ref_diff}");
}

#[test]
fn inconsistent_steps_are_rejected_without_panicking() {
    let c = config(Architecture::Llama);
    let model = load(&c, &random_weights(&c, 12));
    let mut cache = f32_cache(&c, 4, 4);
    let make = |token: u32, position: u32, table: &'static [u32]| StepInput {
        tokens: vec![token],
        positions: vec![position],
        seqs: vec![SeqSpan {
            start: 0,
            len: 1,
            context_len: 2,
            block_table: table,
            prompt: false,
        }],
        logit_rows: vec![0],
    };
    static TABLE: [u32; 2] = [2, 0];
    static BAD_TABLE: [u32; 1] = [9];
    assert!(model.forward(&make(5, 1, &TABLE), &mut cache).is_ok());
    // A token outside the vocabulary, a position the sequence's context does not end at, a
    // block outside the cache.
    assert!(model.forward(&make(300, 1, &TABLE), &mut cache).is_err());
    assert!(model.forward(&make(5, 0, &TABLE), &mut cache).is_err());
    assert!(model.forward(&make(5, 1, &BAD_TABLE), &mut cache).is_err());
}

/// SmolLM2-135M's attention shape: 9 query heads over 3 KV heads of 64, rope base 1e5, tied.
#[test]
fn smollm2_shape_matches_reference() {
    let mut c = config(Architecture::Llama);
    c.num_attention_heads = 9;
    c.num_key_value_heads = 3;
    c.head_dim = 64;
    c.hidden_size = 576;
    c.rope_theta = 100_000.0;
    c.tie_word_embeddings = true;
    assert_matches_reference(&c, 16, 1);
}
