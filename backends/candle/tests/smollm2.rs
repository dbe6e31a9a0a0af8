//! The default real model, SmolLM2-135M-Instruct (Q4_1 GGUF), end to end through the engine:
//! GGUF weights with llama.cpp's q/k layout, the tokenizer and chat template from GGUF metadata,
//! greedy decoding. `scripts/fetch-model.sh` (run by `make test`) puts the file in `models/`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use wick_backend_candle::kv_cache::KvCache;
use wick_backend_candle::model::{SeqSpan, StepInput};

use wick_backend_candle::engine::{Engine, EngineOptions, NewRequest};
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::sampling::SamplingParams;
use wick_backend_candle::source;
use wick_backend_candle::stopping::StoppingParams;
use wick_backend_candle::weights::LoadOptions;

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
    );
    let mut engine = Engine::new(
        Box::new(model),
        loaded.config.clone(),
        loaded.tokenizer,
        options,
    );
    let input_ids = engine.tokenize(&prompt, false).unwrap();
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
        blocks: vec![],
        slots: vec![],
        cache_len: 0,
        chunk_len: None,
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
    let ids = loaded
        .tokenizer
        .encode("<|im_start|>user\nWhat is the capital of France?", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let n = ids.len();

    let blocks = [3u32, 1, 0, 2];
    let mut cache = KvCache::new(&loaded.config, 4, 16);
    let step = StepInput {
        tokens: ids.clone(),
        positions: (0..n as u32).collect(),
        slots: (0..n)
            .map(|p| blocks[p / 16] * 16 + (p % 16) as u32)
            .collect(),
        seqs: vec![SeqSpan {
            start: 0,
            len: n,
            context_len: n,
            block_table: &blocks,
        }],
        logit_rows: (0..n as u32).collect(),
    };
    let ours = model.forward(&step, &mut cache).unwrap();

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
        let row: Vec<f32> = ours.get(len - 1).unwrap().to_vec1().unwrap();
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
