//! What enters the engine and what it answers: plain data, no proto and no candle types.

use crate::model::StepProfile;
use crate::sampling::SamplingParams;
use crate::stopping::{FinishReason, StoppingParams};

/// A request entering the engine (TGI's `Request`, already tokenized and normalised).
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: u64,
    pub input_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// Return the logprob of every prompt token.
    pub prefill_logprobs: bool,
    pub top_n_tokens: u32,
    /// KV blocks of the whole allocation (prompt + new tokens), chosen by the router (or
    /// whoever drives the engine: warmup, the benchmark): position `p` lives in slot
    /// `blocks[p / block_size] · block_size + p % block_size`.
    pub blocks: Vec<u32>,
    /// Prompt tokens whose K/V are already in `blocks` (prefix cache).
    pub cache_len: u32,
    /// Prompt tokens computed per step; `None` = the whole remaining prompt at once.
    pub chunk_len: Option<u32>,
    /// What the generated text must match (structured output), enforced token by token.
    pub grammar: Option<wick_grammar::Grammar>,
}

/// One token with its logprob and text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub text: String,
    /// The token is one of the tokenizer's added special tokens.
    pub special: bool,
}

/// How and why a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Every generated token decoded without special tokens (a matched stop sequence included).
    pub text: String,
    pub generated_tokens: u32,
    pub reason: FinishReason,
    /// With [`FinishReason::StopSequence`], where the matched stop sequence starts in `text`.
    pub stop_start: Option<usize>,
    /// The seed, when the request sampled.
    pub seed: Option<u64>,
}

/// The token one request produced in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub request_id: u64,
    /// Prompt tokens with their logprobs (the first is NaN), once, when the prompt completes and
    /// `prefill_logprobs` was asked.
    pub prefill: Option<Vec<TokenOut>>,
    pub token: TokenOut,
    /// The `top_n_tokens` most likely alternatives for `token`.
    pub top_tokens: Vec<TokenOut>,
    pub finished: Option<Finished>,
}

/// A batch the engine holds (TGI's `CachedBatch`); finished requests are already gone from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBatchInfo {
    pub id: u64,
    pub request_ids: Vec<u64>,
    pub size: u32,
    /// KV token slots the batch's requests hold (blocks × block size).
    pub max_tokens: u32,
    /// Tokens the next forward pass of this batch computes.
    pub current_tokens: u32,
}

/// The result of one prefill or decode step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub generations: Vec<Generation>,
    /// `None` when every request finished.
    pub batch: Option<CachedBatchInfo>,
    pub forward_ns: u64,
    /// The parts of `forward_ns` spent in the linear layers and in attention.
    pub profile: StepProfile,
    pub decode_ns: u64,
    pub total_ns: u64,
    /// Time spent merging batches, when batches were merged.
    pub concat_ns: Option<u64>,
    /// How long the engine waited between its previous step's end and this step's start
    /// (`None` for its first step).
    pub idle_ns: Option<u64>,
}

/// What warmup found the shard can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmupInfo {
    pub max_supported_total_tokens: u32,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
}

/// The limits a warmup request asks for (unset values are derived as TGI does).
#[derive(Debug, Clone, Copy, Default)]
pub struct WarmupLimits {
    pub max_input_tokens: Option<u32>,
    pub max_prefill_tokens: u32,
    pub max_total_tokens: Option<u32>,
}
