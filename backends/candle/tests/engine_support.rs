//! What the engine tests share: a tiny random model's engine, prompts, requests, and
//! running a request alone.

#![allow(dead_code)]

use wick_backend_candle::engine::{Engine, EngineOptions, Generation, NewRequest};
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::sampling::SamplingParams;
use wick_backend_candle::stopping::StoppingParams;
use wick_backend_candle::testing::{tiny_tokenizer, tiny_vocab_size, tiny_weights, TinyModelSpec};
use wick_backend_candle::weights::{LoadOptions, WeightStore};

pub const BLOCK_SIZE: usize = 16;
pub const NUM_BLOCKS: usize = 256;
/// Blocks of the region each request id owns (the router's part in these tests: request `id`
/// holds blocks `16·id..`, so requests with different ids never share one).
pub const BLOCKS_PER_ID: usize = 16;

pub fn engine() -> Engine {
    engine_with(&LoadOptions::default())
}

/// The tiny model's engine with its weights loaded by `options` (e.g. quantized).
pub fn engine_with(options: &LoadOptions) -> Engine {
    let spec = TinyModelSpec::llama();
    let vocab = tiny_vocab_size();
    let config = spec.config(vocab);
    let weights = WeightStore::Tensors(tiny_weights(&spec, vocab));
    let model = LlamaModel::load(&config, &weights, options).unwrap();
    Engine::new(
        Box::new(model),
        config,
        tiny_tokenizer(),
        EngineOptions {
            block_size: BLOCK_SIZE,
            num_blocks: NUM_BLOCKS,
            kv_dtype: Default::default(),
        },
    )
}

/// A deterministic prompt of `len` ordinary (non-special) tokens, different per `salt`.
pub fn prompt(len: usize, salt: u32) -> Vec<u32> {
    let vocab = tiny_vocab_size() as u32;
    (0..len as u32)
        .map(|i| 3 + (i * 31 + salt * 17 + i * i * 7) % (vocab - 3))
        .collect()
}

pub fn greedy() -> SamplingParams {
    SamplingParams::default()
}

pub fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        do_sample: true,
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        seed,
        repetition_penalty: 1.1,
        ..SamplingParams::default()
    }
}

pub fn request(
    id: u64,
    input_ids: Vec<u32>,
    max_new_tokens: u32,
    sampling: SamplingParams,
) -> NewRequest {
    let input_ids_len = input_ids.len();
    NewRequest {
        id,
        input_ids,
        sampling,
        stopping: StoppingParams {
            max_new_tokens,
            stop_sequences: Vec::new(),
            ignore_eos: true,
            min_new_tokens: 0,
        },
        prefill_logprobs: false,
        top_n_tokens: 0,
        blocks: blocks_of(id, input_ids_len + max_new_tokens as usize - 1),
        cache_len: 0,
        chunk_len: None,
        grammar: None,
    }
}

/// Runs one request alone until it finishes; returns its generations.
pub fn run_alone(engine: &mut Engine, r: NewRequest) -> Vec<Generation> {
    let mut generations = Vec::new();
    let mut out = engine.prefill(1000 + r.id, vec![r], None).unwrap();
    loop {
        generations.extend(out.generations.clone());
        let Some(batch) = out.batch else { break };
        out = engine.decode(&[batch.id]).unwrap();
    }
    generations
}

/// The blocks request `id` gets for `positions` token positions, in its own region.
pub fn blocks_of(id: u64, positions: usize) -> Vec<u32> {
    let first = id as usize * BLOCKS_PER_ID;
    (first..first + positions.div_ceil(BLOCK_SIZE))
        .map(|b| b as u32)
        .collect()
}

pub fn assert_no_leak(engine: &Engine) {
    assert!(
        engine.batch_ids().is_empty(),
        "batches left: {:?}",
        engine.batch_ids()
    );
}
