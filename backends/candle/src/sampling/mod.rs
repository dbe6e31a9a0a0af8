//! Per-request token choice: penalties, temperature, top-k, top-p, typical-p, seeded sampling,
//! logprobs of the chosen token and of the top-n alternatives.
//!
//! The order of the logits processors follows Hugging Face `generate` (and so TGI and vLLM):
//! logit bias, repetition penalty, frequency and presence penalties, then either greedy argmax or
//! temperature → top-k → top-p → typical-p → a draw from the renormalised distribution.
//!
//! A request's random stream depends only on its seed: each [`Sampler`] owns a xoshiro256**
//! generator (seeded through SplitMix64) and draws exactly one uniform number per sampled token,
//! so its tokens never depend on its batch neighbours, on the vocabulary order of other requests,
//! or on the version of a random-number crate.

use std::collections::{HashMap, HashSet};

mod lanes;
mod rng;
#[cfg(test)]
mod tests;

use lanes::*;
use rng::Xoshiro256StarStar;

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
    /// Added to these tokens' logits first (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
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
            logit_bias: Vec::new(),
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
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256StarStar,
    /// Tokens of the prompt and of the generation, for the repetition penalty (empty when off).
    seen: HashSet<u32>,
    /// How often each token was generated (frequency and presence penalties).
    generated: HashMap<u32, u32>,
    /// Scratch, one entry per vocabulary id: `exp(logit - max)` of the current step.
    probs: Vec<f32>,
    /// Scratch, one entry per vocabulary id: typical-p's distance to the entropy.
    keys: Vec<f32>,
    /// Scratch: candidate ids while filtering, and the ids of top-n.
    cands: Vec<u32>,
    /// Scratch: (id, value) of a small top-k / top-n selection.
    top_buf: Vec<(u32, f32)>,
    /// The step's logits after the penalties and the temperature, when either applies (the
    /// model's row is read as it is otherwise, without a copy).
    processed: Vec<f32>,
}

impl Sampler {
    /// `prompt` seeds the repetition penalty's token set.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seen = if repetition_active(params.repetition_penalty) {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            rng: Xoshiro256StarStar::seed_from_u64(params.seed),
            params,
            seen,
            generated: HashMap::new(),
            probs: Vec::new(),
            keys: Vec::new(),
            cands: Vec::new(),
            top_buf: Vec::new(),
            processed: Vec::new(),
        }
    }

    /// This request's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed of this request's random stream (reported back in the final `Generation`).
    pub fn seed(&self) -> u64 {
        self.params.seed
    }

    /// How many times `token` was generated so far.
    pub fn generated_count(&self, token: u32) -> u32 {
        self.generated.get(&token).copied().unwrap_or(0)
    }

    /// Picks the next token from this request's `logits` row and records it. The row is read
    /// as it is; the penalties and the temperature, when they apply, work on a copy (see
    /// [`Sampler::processed`]).
    ///
    /// The logprobs (of the chosen token and of `top`) are those of the distribution after the
    /// penalties and the temperature, before top-k/top-p/typical-p filtering; greedy requests
    /// use temperature 1.
    pub fn next(&mut self, row: &[f32], top_n: usize) -> Sampled {
        let mut processed = std::mem::take(&mut self.processed);
        let sampled = self.next_from(row, &mut processed, top_n);
        self.processed = processed;
        sampled
    }

    /// The last step's logits after the penalties and the temperature; empty when neither
    /// applied.
    pub fn processed(&self) -> &[f32] {
        &self.processed
    }

    /// [`Sampler::next`], with `processed` the sampler's buffer taken out of it.
    fn next_from(&mut self, row: &[f32], processed: &mut Vec<f32>, top_n: usize) -> Sampled {
        if row.is_empty() {
            // Nothing to choose from; a model always has a vocabulary, so this is a caller bug,
            // but a serving path must not panic on it.
            return Sampled {
                id: 0,
                logprob: f32::NEG_INFINITY,
                top: Vec::new(),
            };
        }
        let t = self.params.temperature;
        // temperature → 0 is the argmax; 0 (or junk) means greedy rather than a division by 0.
        let mut greedy = !(self.params.do_sample && t > 0.0 && t.is_finite());
        let scaled = !greedy && t != 1.0;
        processed.clear();
        let logits: &[f32] = if self.penalties_active() || scaled {
            processed.extend_from_slice(row);
            self.apply_penalties(processed);
            if scaled {
                // A temperature so small that the scaled logits overflow (1e-45, say) is the
                // limit t → 0, the argmax: infinities would leave only NaN probabilities.
                let largest = processed
                    .iter()
                    .filter(|l| l.is_finite())
                    .fold(0f32, |m, l| m.max(l.abs()));
                if (largest / t).is_finite() {
                    for l in processed.iter_mut() {
                        *l /= t;
                    }
                } else {
                    greedy = true;
                }
            }
            processed
        } else {
            row
        };

        let max = max_of(logits);
        let id = if !max.is_finite() {
            // All -inf (or a +inf): the distribution is degenerate; take the first maximum.
            let id = first_index_of(logits, max);
            let sampled = Sampled {
                id,
                logprob: if max == f32::INFINITY {
                    0.0
                } else {
                    f32::NEG_INFINITY
                },
                top: Vec::new(),
            };
            self.record(id);
            return sampled;
        } else if greedy {
            first_index_of(logits, max)
        } else {
            u32::MAX // chosen below, once the probabilities exist
        };

        // Greedy decoding needs only the normaliser (for the chosen token's logprob);
        // sampling draws from the stored exponentials.
        let z = if greedy {
            exp_sum(logits, max)
        } else {
            self.probs.resize(logits.len(), 0.0);
            exp_shifted(logits, max, &mut self.probs);
            sum_f64(&self.probs)
        };
        let log_z = max + z.ln() as f32;

        let id = if greedy {
            id
        } else {
            self.sample(logits, max, z)
        };
        let logprob = logits[id as usize] - log_z;
        let top = self.top_n(logits, top_n, log_z);
        self.record(id);
        Sampled { id, logprob, top }
    }

    fn record(&mut self, id: u32) {
        *self.generated.entry(id).or_insert(0) += 1;
        if repetition_active(self.params.repetition_penalty) {
            self.seen.insert(id);
        }
    }

    fn penalties_active(&self) -> bool {
        !self.params.logit_bias.is_empty()
            || repetition_active(self.params.repetition_penalty)
            || self.params.frequency_penalty != 0.0
            || self.params.presence_penalty != 0.0
    }

    /// The logit bias (OpenAI: added as given), then repetition (HF: divide positive logits,
    /// multiply negative ones), then frequency and presence (OpenAI: subtract `freq * count +
    /// presence` for generated tokens). Only the biased tokens and those already seen are
    /// touched.
    fn apply_penalties(&self, logits: &mut [f32]) {
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let rep = self.params.repetition_penalty;
        if repetition_active(rep) {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rep } else { *l * rep };
                }
            }
        }
        let freq = self.params.frequency_penalty;
        let presence = self.params.presence_penalty;
        if freq != 0.0 || presence != 0.0 {
            for (&t, &count) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= freq * count as f32 + presence;
                }
            }
        }
    }

    /// Draws from `self.probs` (`exp(logit - max)`, total `z`) after top-k, top-p, typical-p.
    ///
    /// Without top-k the filters run densely over the whole vocabulary (a bisection on a
    /// threshold, no sort); with top-k they run on the k sorted candidates.
    fn sample(&mut self, logits: &[f32], max: f32, z: f64) -> u32 {
        let u = self.rng.next_f64();
        let vocab = logits.len();
        let top_k = self.params.top_k as usize;
        let top_p = self.params.top_p;
        let typical_p = self.params.typical_p;

        if top_k > 0 && top_k < vocab {
            return self.sample_top_k(logits, max, top_k, u);
        }
        let mut total = z;
        if top_p < 1.0 {
            self.keys.resize(vocab, 0.0);
            for ((k, &w), &l) in self.keys.iter_mut().zip(&self.probs).zip(logits) {
                *k = if w > 0.0 { -l } else { f32::INFINITY };
            }
            keep_smallest_mass(&self.keys, &mut self.probs, top_p.max(0.0) as f64 * total);
            total = sum_f64(&self.probs);
        }
        if typical_p < 1.0 {
            self.keys.resize(vocab, 0.0);
            let shift = entropy_shift(max, total, weighted_logit_sum(&self.probs, logits, max));
            for ((k, &w), &l) in self.keys.iter_mut().zip(&self.probs).zip(logits) {
                *k = if w > 0.0 {
                    (shift - l).abs()
                } else {
                    f32::INFINITY
                };
            }
            keep_smallest_mass(
                &self.keys,
                &mut self.probs,
                typical_p.max(0.0) as f64 * total,
            );
            total = sum_f64(&self.probs);
        }
        // Walk in id order: the draw never depends on a sort's tie-breaking.
        draw(self.probs.iter().copied().enumerate(), u * total)
    }

    /// Top-k, then top-p and typical-p on the k candidates sorted by logit.
    fn sample_top_k(&mut self, logits: &[f32], max: f32, k: usize, u: f64) -> u32 {
        top_ids(logits, k, &mut self.top_buf, &mut self.cands);
        let probs = &self.probs;
        let mass = |cands: &[u32]| -> f64 { cands.iter().map(|&c| probs[c as usize] as f64).sum() };
        if self.params.top_p < 1.0 {
            let target = self.params.top_p.max(0.0) as f64 * mass(&self.cands);
            truncate_at_mass(&mut self.cands, probs, target);
        }
        if self.params.typical_p < 1.0 {
            let total = mass(&self.cands);
            let weighted: f64 = self
                .cands
                .iter()
                .map(|&c| probs[c as usize] as f64 * (logits[c as usize] - max) as f64)
                .sum();
            let shift = entropy_shift(max, total, weighted);
            let key = |c: u32| (shift - logits[c as usize]).abs();
            self.cands
                .sort_unstable_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
            truncate_at_mass(
                &mut self.cands,
                probs,
                self.params.typical_p.max(0.0) as f64 * total,
            );
        }
        let target = u * mass(&self.cands);
        draw(
            self.cands.iter().map(|&c| (c as usize, probs[c as usize])),
            target,
        )
    }

    /// The `n` highest logits as (id, logprob), descending; ties keep the lower id first.
    fn top_n(&mut self, logits: &[f32], n: usize, log_z: f32) -> Vec<(u32, f32)> {
        top_ids(logits, n, &mut self.top_buf, &mut self.cands);
        self.cands
            .iter()
            .map(|&id| (id, logits[id as usize] - log_z))
            .collect()
    }
}

/// Logprob of `target` under `log_softmax(logits)` (prompt logprobs); -inf when out of range.
pub fn logprob_of(logits: &[f32], target: u32) -> f32 {
    let Some(&l) = logits.get(target as usize) else {
        return f32::NEG_INFINITY;
    };
    let max = max_of(logits);
    if !max.is_finite() {
        return if l == max && max == f32::INFINITY {
            0.0
        } else {
            f32::NEG_INFINITY
        };
    }
    // Called once per prompt token with prefill logprobs: the vectorised exp, no allocation.
    let z = lane_sum(logits, logits, |x, _| exp_nonpositive(x - max));
    l - max - z.ln() as f32
}

fn repetition_active(penalty: f32) -> bool {
    penalty > 0.0 && penalty != 1.0 && penalty.is_finite()
}
