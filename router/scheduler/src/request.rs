//! The contract between the HTTP edge and the scheduler: a request after validation, and the
//! events and errors it produces.

use std::time::Instant;

use wick_proto::v1 as pb;

/// Sampling parameters after validation (TGI's defaults applied; 1.0 = off for the
/// multiplicative ones).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidParameters {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub typical_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Structured output: the grammar the generated text must match, as the shards take it.
    pub grammar: Option<ValidGrammar>,
    /// Added to these tokens' logits (OpenAI's `logit_bias`), ids checked against the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
}

/// A grammar the router compiled (so it is known to be valid), in its wire form.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGrammar {
    pub kind: pb::GrammarType,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidStoppingParameters {
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos_token: bool,
    /// No end token and no stop sequence before this many new tokens.
    pub min_new_tokens: u32,
}

/// A request that passed validation: tokenized, truncated, limits checked.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Prompt token ids (already truncated to `truncate`).
    pub input_ids: Vec<u32>,
    pub parameters: ValidParameters,
    pub stopping: ValidStoppingParameters,
    pub top_n_tokens: u32,
    /// Return the prompt tokens with their logprobs (disables prefix-cache reuse for it).
    pub decoder_input_details: bool,
}

/// One token as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// Output text without special tokens; includes a matched stop sequence (as TGI).
    pub text: String,
    pub generated_tokens: u32,
    /// As the shard said it (the HTTP edge turns it into TGI's or OpenAI's spelling).
    pub finish_reason: pb::FinishReason,
    /// Where the matched stop sequence starts in `text` (the shard found it).
    pub stop_sequence_start: Option<usize>,
    pub seed: Option<u64>,
}

impl GeneratedText {
    /// The text up to the matched stop sequence (OpenAI's answers leave it out), else all of
    /// it.
    pub fn text_before_stop(&self) -> &str {
        self.stop_sequence_start
            .and_then(|at| self.text.get(..at))
            .unwrap_or(&self.text)
    }
}

/// Events of one request, in order: at most one `Prefill`, any number of `Intermediate`, one
/// `End` (or an error).
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// Prompt tokens with logprobs (first is NaN); only with `decoder_input_details`.
    Prefill(Vec<Token>),
    Intermediate {
        token: Token,
        top_tokens: Vec<Token>,
    },
    End {
        token: Token,
        top_tokens: Vec<Token>,
        generated_text: GeneratedText,
        /// When the request entered the queue and when its batch started.
        queued: Instant,
        start: Instant,
    },
}

/// Why a request failed after validation. `Display` gives TGI's messages.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// Every `max_concurrent_requests` permit is taken.
    #[error("Model is overloaded")]
    Overloaded,
    /// A shard call failed while the request ran (or it could never be scheduled).
    #[error("Request failed during generation: Server error: {0}")]
    GenerationError(String),
    /// The stream ended without an `End` event.
    #[error("Incomplete generation")]
    IncompleteGeneration,
    #[error("Incomplete generation stream")]
    IncompleteGenerationStream,
    /// The deployment's `--request-deadline` passed before the request ended; it was
    /// cancelled.
    #[error("Request cancelled: it did not finish within the deadline of {0:?}")]
    DeadlineExceeded(std::time::Duration),
}

impl InferError {
    /// The `error_type` of the JSON error body, also the `err` label of `tgi_request_failure`.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Overloaded => "overloaded",
            Self::GenerationError(_) => "generation",
            Self::IncompleteGeneration => "incomplete_generation",
            Self::IncompleteGenerationStream => "incomplete_generation_stream",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
        }
    }
}
