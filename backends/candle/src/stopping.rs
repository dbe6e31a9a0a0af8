//! When a request stops (max_new_tokens, EOS ids, stop sequences on the decoded text), and the
//! incremental detokenizer that gives each generated token its text.

use tokenizers::Tokenizer;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoppingParams {
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

pub struct StopCriteria {}

impl StopCriteria {
    pub fn new(_params: StoppingParams, _eos_token_ids: &[u32]) -> Self {
        todo!()
    }

    /// Called once per generated token with its id and the text it added (possibly empty while
    /// a multi-byte character is incomplete).
    pub fn check(&mut self, _token: u32, _new_text: &str) -> Option<FinishReason> {
        todo!()
    }
}

/// Incremental detokenization with prefix/read offsets into `all_ids` (prompt + generated).
pub struct Detokenizer {}

impl Detokenizer {
    /// `prompt_len`: tokens of `all_ids` that are prompt.
    pub fn new(_prompt_len: usize) -> Self {
        todo!()
    }

    /// Text added by the last id of `all_ids` ("" while it ends in an incomplete character).
    pub fn next_text(&mut self, _tokenizer: &Tokenizer, _all_ids: &[u32]) -> tokenizers::Result<String> {
        todo!()
    }
}
