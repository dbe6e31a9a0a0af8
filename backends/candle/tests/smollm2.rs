//! The default real model, SmolLM2-135M-Instruct (Q4_1 GGUF), end to end through the engine:
//! GGUF weights with llama.cpp's q/k layout, the tokenizer and chat template from GGUF metadata,
//! greedy decoding. `scripts/fetch-model.sh` (run by `make test`) puts the file in `models/`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use wick_backend_candle::kv_cache::KvCache;
use wick_backend_candle::step::{SeqSpan, StepInput};

use wick_backend_candle::engine::{Engine, EngineOptions, NewRequest};
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::parallel::SocketCollective;
use wick_backend_candle::sampling::SamplingParams;
use wick_backend_candle::source;
use wick_backend_candle::stopping::StoppingParams;
use wick_backend_candle::weights::LoadOptions;
use wick_kernels::{KvDtype, Outliers};

fn model_path() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        Some(path)
    } else {
        // `make test` fetches the file first, so CI always runs this test.
        eprintln!("{} is absent: run scripts/fetch-model.sh", path.display());
        None
    }
}

/// Renders the model's own chat template, as the router does.
fn render(template: &str, messages: &[(&str, &str)]) -> String {
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template).unwrap();
    let messages: Vec<_> = messages
        .iter()
        .map(|&(role, content)| minijinja::context! { role => role, content => content })
        .collect();
    env.get_template("chat")
        .unwrap()
        .render(minijinja::context! { messages => messages, add_generation_prompt => true })
        .unwrap()
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(path) = model_path() else { return };
    let opts = LoadOptions::default();
    let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
    let model = LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap();
    let template = loaded
        .chat_template
        .clone()
        .expect("the GGUF carries a chat template");
    let prompt = render(
        &template,
        &[
            ("system", "You are a helpful assistant."),
            ("user", "What is the capital of France?"),
        ],
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");

    let options = EngineOptions::from_budget(
        &loaded.config,
        loaded.config.num_key_value_heads,
        64 << 20,
        16,
        Default::default(),
    );
    let mut engine = Engine::new(
        Box::new(model),
        loaded.config.clone(),
        loaded.tokenizer,
        options,
    );
    let input_ids = engine
        .tokenizer()
        .encode_fast(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    // The router's part: the KV blocks of the whole allocation (block size 16).
    let blocks = (0..(input_ids.len() + 24).div_ceil(16) as u32).collect();
    let request = NewRequest {
        id: 1,
        input_ids,
        sampling: SamplingParams::default(),
        stopping: StoppingParams {
            max_new_tokens: 24,
            ..Default::default()
        },
        prefill_logprobs: false,
        top_n_tokens: 0,
        blocks,
        cache_len: 0,
        chunk_len: None,
        grammar: None,
    };
    let mut out = engine.prefill(1, vec![request], None).unwrap();
    let mut text = String::new();
    loop {
        let generation = &out.generations[0];
        text.push_str(&generation.token.text);
        if let Some(finished) = &generation.finished {
            text = finished.text.clone();
            break;
        }
        out = engine.decode(&[out.batch.unwrap().id]).unwrap();
    }
    eprintln!("answer: {text:?}");
    assert!(text.contains("Paris"), "answer: {text:?}");
}

/// With every weight on the quantized path (no f32 copies), our packed/paged model agrees with
/// candle-transformers' own `quantized_llama` on the same file at every prompt position. This
/// Q4_1 model amplifies float rounding: the reference's own prefill and token-by-token runs
/// differ by more than 1 logit on long prompts, so the bound is loose; a wrong q/k row order or
/// a misread tensor is off by far more, and the top choice must agree.
#[test]
fn smollm2_logits_match_candle_quantized_llama() {
    let Some(path) = model_path() else { return };
    let opts = LoadOptions {
        dense_copy_min_rows: None,
        ..LoadOptions::default()
    };
    let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
    let model = LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap();
    let ids = question_ids(&loaded);
    let n = ids.len();
    // Blocks out of order, as the router may hand them out.
    let ours = prefill_logits(&model, &ids, &[3, 1, 0, 2], KvDtype::F32);

    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    for len in 1..=n {
        let input = Tensor::new(&ids[..len], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs: Vec<f32> = reference
            .forward(&input, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let row = &ours[len - 1];
        let diff = row
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 2.0, "prefix {len}: max |logit diff| {diff}");
        let best = argmax(&theirs);
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        assert!(
            order[..3].contains(&best),
            "prefix {len}: reference top token {best} not in our top 3"
        );
    }
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// The tokens of a user turn asking for the capital of France (no generation prompt).
fn question_ids(loaded: &source::LoadedModel) -> Vec<u32> {
    loaded
        .tokenizer
        .encode("<|im_start|>user\nWhat is the capital of France?", false)
        .unwrap()
        .get_ids()
        .to_vec()
}

/// The logits of every position of `ids` prefilled at once into a 4-block cache of `dtype`
/// values, the sequence in `blocks` (16 slots each).
fn prefill_logits(
    model: &LlamaModel,
    ids: &[u32],
    blocks: &[u32],
    dtype: KvDtype,
) -> Vec<Vec<f32>> {
    let n = ids.len();
    let kv_heads = model.plan().kv_heads.len();
    let mut cache = KvCache::with_dtype(model.config(), kv_heads, blocks.len(), 16, dtype);
    let step = StepInput {
        tokens: ids.to_vec(),
        positions: (0..n as u32).collect(),
        seqs: vec![SeqSpan {
            start: 0,
            len: n,
            context_len: n,
            block_table: blocks,
            prompt: true,
        }],
        logit_rows: (0..n as u32).collect(),
    };
    model.forward(&step, &mut cache).unwrap().to_vec2().unwrap()
}

/// SmolLM2's 9 heads and 3 KV heads split over 3 ranks (threads joined by the socket
/// collective), its Q4_1 rows and 32-element column blocks sliced as stored: every position's
/// logits match the whole model's.
#[test]
fn smollm2_split_over_three_ranks_matches_the_whole_model() {
    let Some(path) = model_path() else { return };
    let opts = LoadOptions::default();
    let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
    let ids = question_ids(&loaded);
    let whole = prefill_logits(
        &LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap(),
        &ids,
        &[0, 1, 2, 3],
        KvDtype::default(),
    );
    drop(loaded);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tp");
    let ranks: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|rank| {
            let (base, path, ids, opts) = (base.clone(), path.clone(), ids.clone(), opts.clone());
            std::thread::spawn(move || {
                let comm =
                    SocketCollective::connect(&base, rank, 3, Duration::from_secs(120)).unwrap();
                let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
                let model = LlamaModel::load_parallel(
                    &loaded.config,
                    &loaded.weights,
                    &opts,
                    Arc::new(comm),
                )
                .unwrap();
                assert_eq!(model.plan().heads.len(), 3);
                prefill_logits(&model, &ids, &[0, 1, 2, 3], KvDtype::default())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(ranks.iter().all(|r| r == &ranks[0]), "ranks disagree");
    let mut worst = 0f32;
    let (mut sum, mut count) = (0f64, 0usize);
    for (a, b) in ranks[0].iter().zip(&whole) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
            sum += (x - y).abs() as f64;
            count += 1;
        }
        // The top choice must agree wherever the whole model's margin exceeds the bound.
        let (best, margin) = top_margin(b);
        if margin > SPLIT_MAX_DIFF {
            assert_eq!(argmax(a), best, "margin {margin}");
        }
    }
    let mean = sum / count as f64;
    eprintln!("SmolLM2 over 3 ranks: |Δlogit| max {worst:.3}, mean {mean:.2e}");
    assert!(worst <= SPLIT_MAX_DIFF, "max |Δlogit| {worst}");
    assert!(mean <= SPLIT_MEAN_DIFF, "mean |Δlogit| {mean}");
}

/// Split and whole run the same kernels, but the ranks' partial sums add up in another order
/// than the whole model's, a float-level difference. With 8-bit activations that is enough to
/// move activations across rounding boundaries (one step of amax/127 in that element), and
/// this model carries such steps through its 30 layers: split and whole then differ about as
/// much as either differs from the f32 path (see the log-probability test): |Δlogit| 0.87 at
/// most and 0.14 on average, measured. A misread slice is off by several logits everywhere.
const SPLIT_MAX_DIFF: f32 = 1.5;
const SPLIT_MEAN_DIFF: f64 = 0.25;

/// The top entry and its lead over the second.
fn top_margin(v: &[f32]) -> (usize, f32) {
    let best = argmax(v);
    let second = (0..v.len())
        .filter(|&i| i != best)
        .map(|i| v[i])
        .fold(f32::NEG_INFINITY, f32::max);
    (best, v[best] - second)
}

/// Log-probabilities of each next prompt token under `logits` (position `i` predicts `i + 1`).
fn prompt_logprobs(logits: &[Vec<f32>], ids: &[u32]) -> Vec<f64> {
    logits
        .iter()
        .zip(&ids[1..])
        .map(|(row, &next)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            row[next as usize] as f64 - max - sum.ln()
        })
        .collect()
}

/// Texts whose prompt log-probabilities the accuracy test compares: a chat turn, a longer
/// chat exchange, prose and code (211 predicted tokens in all).
const LOGPROB_TEXTS: [&str; 4] = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
     Write one sentence about the sea, the wind and the old lighthouse keeper.<|im_end|>",
    "<|im_start|>user\nExplain in two short paragraphs why the sky is blue during the day and \
     red at sunset, for a curious ten year old.<|im_end|>\n<|im_start|>assistant\nSunlight is \
     made of many colours. When it passes through the air, the tiny molecules scatter the blue \
     light much more than the red light, so blue comes at us from every direction.<|im_end|>",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg \
     combined movable metal type with an oil-based ink and a screw press adapted from wine \
     making. Within fifty years, presses were running in more than two hundred European cities, \
     and the price of books fell sharply.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    \
     return a\n\nprint([fibonacci(i) for i in range(10)])\n",
];

/// wick's kernels (Q4_1 weights as stored, 8-bit activations) against the same weights
/// dequantized to f32 and run in f32, over [`LOGPROB_TEXTS`]. Plain 8-bit activation blocks (as
/// llama.cpp's q8_0/q8_1) move the prompt log-probabilities more: a few channels of the
/// residual stream sit at 15–30× their row's RMS and set their blocks' scales, coarsening the
/// other 31 values. Blocks whose largest value exceeds 4.5× their RMS take a second 8-bit pass
/// over their rounding error (7–19% of the blocks of this model's inputs); with the default f16
/// KV cache against the f32 path with an f32 cache that measured 0.027–0.032 nats (bound 0.05).
/// The 8-bit rounding makes the figure jump with any change of the last bits upstream (scaling
/// the queries by 1 ± 1e-6 moves it within that range, and the first text alone between 0.040
/// and 0.051), so it is taken over all the texts, not one short prompt.
///
/// The KV cache's type alone, on the f32 path: an f16 cache moves the log-probabilities by
/// about 0.001 nats on average (bound 0.005), a bf16 cache by about 0.005 (bound 0.02), the
/// opt-in q8_0 cache by 0.0215 (measured; bound 0.04).
#[test]
fn smollm2_prompt_logprobs_stay_close_to_the_f32_path() {
    let Some(path) = model_path() else { return };
    let blocks: Vec<u32> = (0..8).collect();
    let logprobs = |opts: LoadOptions, dtype: KvDtype| {
        let loaded = source::load(path.to_str().unwrap(), None, None, true, &opts).unwrap();
        let model = LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap();
        let mut all = Vec::new();
        for text in LOGPROB_TEXTS {
            let ids = loaded
                .tokenizer
                .encode(text, false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert!(ids.len() >= 24 && ids.len() <= 128, "{} tokens", ids.len());
            all.extend(prompt_logprobs(
                &prefill_logits(&model, &ids, &blocks, dtype),
                &ids,
            ));
        }
        (all, model.kernels())
    };
    let (ours, kernels) = logprobs(LoadOptions::default(), KvDtype::default());
    assert!(kernels["q4_1"].starts_with("wick"), "{kernels:?}");
    let plain_opts = LoadOptions {
        activation_outliers: Outliers::Plain,
        ..LoadOptions::default()
    };
    let (plain, _) = logprobs(plain_opts, KvDtype::default());
    let f32_opts = LoadOptions {
        dequantize: true,
        ..LoadOptions::default()
    };
    let (f32_path, kernels) = logprobs(f32_opts.clone(), KvDtype::F32);
    assert!(!kernels.contains_key("q4_1"), "{kernels:?}");
    let (f16_kv, _) = logprobs(f32_opts.clone(), KvDtype::F16);
    let (bf16_kv, _) = logprobs(f32_opts.clone(), KvDtype::Bf16);
    let (q8_kv, _) = logprobs(f32_opts, KvDtype::Q8_0);
    let mean_difference = |ours: &[f64]| {
        ours.iter()
            .zip(&f32_path)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / ours.len() as f64
    };
    let (mean, plain) = (mean_difference(&ours), mean_difference(&plain));
    let (f16_kv, bf16_kv) = (mean_difference(&f16_kv), mean_difference(&bf16_kv));
    let q8_kv = mean_difference(&q8_kv);
    eprintln!(
        "prompt logprobs vs f32, mean |Δ| over {}: wick kernels {mean:.4} nats, \
         with plain 8-bit blocks {plain:.4}; f32 path with an f16 KV cache {f16_kv:.4}, \
         bf16 {bf16_kv:.4}, q8_0 {q8_kv:.4}",
        ours.len()
    );
    assert!(mean <= 0.05, "mean |Δlogprob| {mean}");
    // The second pass is what brings the kernels this close.
    assert!(
        plain > mean + 0.01,
        "plain 8-bit blocks: {plain}, refined: {mean}"
    );
    assert!(f16_kv <= 0.005, "f16 KV cache: mean |Δlogprob| {f16_kv}");
    assert!(bf16_kv <= 0.02, "bf16 KV cache: mean |Δlogprob| {bf16_kv}");
    assert!(q8_kv <= 0.04, "q8_0 KV cache: mean |Δlogprob| {q8_kv}");
}
