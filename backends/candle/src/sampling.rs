//! Per-request token choice: penalties, temperature, top-k, top-p, typical-p, seeded sampling,
//! logprobs of the chosen token and of the top-n alternatives.

/// Sampling parameters of one request, already normalised (1.0 = off for the multiplicative ones).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: u32,
    pub top_p: f32,
    pub typical_p: f32,
    /// false = greedy (argmax after penalties).
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

/// The chosen token, its logprob and the `top_n` most likely alternatives (id, logprob).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One request's sampler; it owns the request's random stream and token counts.
pub struct Sampler {}

impl Sampler {
    /// `prompt` seeds the repetition penalty's token set.
    pub fn new(_params: SamplingParams, _prompt: &[u32]) -> Self {
        todo!()
    }

    /// Picks the next token from this request's `logits` (modified in place) and records it.
    pub fn next(&mut self, _logits: &mut [f32], _top_n: usize) -> Sampled {
        todo!()
    }
}

/// Logprob of `target` under `log_softmax(logits)` (prompt logprobs).
pub fn logprob_of(_logits: &[f32], _target: u32) -> f32 {
    todo!()
}
