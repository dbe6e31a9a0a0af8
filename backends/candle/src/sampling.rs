//! Per-request token choice: penalties, temperature, top-k, top-p, typical-p, seeded sampling,
//! logprobs of the chosen token and of the top-n alternatives.
//!
//! The order of the logits processors follows Hugging Face `generate` (and so TGI and vLLM):
//! repetition penalty, frequency and presence penalties, then either greedy argmax or
//! temperature → top-k → top-p → typical-p → a draw from the renormalised distribution.
//!
//! A request's random stream depends only on its seed: each [`Sampler`] owns a xoshiro256**
//! generator (seeded through SplitMix64) and draws exactly one uniform number per sampled token,
//! so its tokens never depend on its batch neighbours, on the vocabulary order of other requests,
//! or on the version of a random-number crate.

use std::collections::{HashMap, HashSet};

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
}

/// Up to this many tokens, top-n and top-k keep a small sorted buffer instead of a selection.
const SMALL_TOP_N: usize = 64;
/// Accumulator lanes of the vocabulary-wide loops: independent sums the compiler vectorises.
const LANES: usize = 16;

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

    /// Picks the next token from this request's `logits` (modified in place) and records it.
    ///
    /// The logprobs (of the chosen token and of `top`) are those of the distribution after the
    /// penalties and the temperature, before top-k/top-p/typical-p filtering; greedy requests
    /// use temperature 1.
    pub fn next(&mut self, logits: &mut [f32], top_n: usize) -> Sampled {
        if logits.is_empty() {
            // Nothing to choose from; a model always has a vocabulary, so this is a caller bug,
            // but a serving path must not panic on it.
            return Sampled {
                id: 0,
                logprob: f32::NEG_INFINITY,
                top: Vec::new(),
            };
        }
        self.apply_penalties(logits);

        let t = self.params.temperature;
        // temperature → 0 is the argmax; 0 (or junk) means greedy rather than a division by 0.
        let greedy = !(self.params.do_sample && t > 0.0 && t.is_finite());
        if !greedy && t != 1.0 {
            for l in logits.iter_mut() {
                *l /= t;
            }
        }

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

        self.probs.resize(logits.len(), 0.0);
        exp_shifted(logits, max, &mut self.probs);
        let z = sum_f64(&self.probs);
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

    /// Repetition (HF: divide positive logits, multiply negative ones), then frequency and
    /// presence (OpenAI: subtract `freq * count + presence` for generated tokens). Only tokens
    /// already seen are touched.
    fn apply_penalties(&self, logits: &mut [f32]) {
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

/// Largest non-NaN value (-inf when there is none). Lanes let the compiler vectorise it.
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    let mut max = rest.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for a in acc {
        max = max.max(a);
    }
    max
}

/// First index holding `value` (0 if none), scanning 16 at a time with a vectorised test.
fn first_index_of(xs: &[f32], value: f32) -> u32 {
    let chunks = xs.chunks_exact(LANES);
    for (c, chunk) in chunks.enumerate() {
        if chunk.iter().fold(false, |any, &x| any | (x == value)) {
            let j = chunk.iter().position(|&x| x == value).unwrap_or(0);
            return (c * LANES + j) as u32;
        }
    }
    let tail = xs.len() - xs.len() % LANES;
    xs[tail..]
        .iter()
        .position(|&x| x == value)
        .map_or(0, |j| (tail + j) as u32)
}

fn exp_shifted(logits: &[f32], max: f32, out: &mut [f32]) {
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = exp_nonpositive(l - max);
    }
}

/// `exp(x)` for `x <= 0` (NaN and anything below -87 give 0), within ~2 ulp of `f32::exp`.
///
/// A softmax over a 50k vocabulary for every request of a batch is dominated by `exp`; libm's
/// scalar call is ~20x slower than this branch-free form, which the compiler vectorises even
/// for baseline x86-64 (no `floor` or float-to-int call: rounding uses the 1.5·2^23 trick).
/// Cephes `expf`: x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial for e^r, then 2^n.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the mantissa
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 0.0); // clamp also maps NaN's comparisons away from the polynomial
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 0]: the exponent field n + 127 stays normal.
    // Wrapping ops: overflow checks (debug builds) would keep the loop scalar.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x >= -87.0 {
        e_r * scale
    } else {
        0.0
    }
}

/// Sum in f32 lanes (vectorisable), folded in f64: exact enough for a softmax normaliser.
fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().chain(rest).map(|&x| x as f64).sum()
}

/// First id whose cumulative weight exceeds `target`; the last positive one if rounding leaves
/// `target` out of reach.
fn draw(weights: impl Iterator<Item = (usize, f32)>, target: f64) -> u32 {
    let mut acc = 0.0f64;
    let mut last = None;
    for (id, w) in weights {
        if w > 0.0 {
            acc += w as f64;
            last = Some(id);
            if acc > target {
                return id as u32;
            }
        }
    }
    last.unwrap_or(0) as u32
}

/// Typical-p's pivot: a token's distance `|-log p - H|` equals `|pivot - logit|`, because
/// `-log p = max + ln Z - logit` and `H = ln Z - weighted / Z` (with `Z` = `total` and
/// `weighted = Σ w·(logit - max)` over the distribution's unnormalised weights `w`).
fn entropy_shift(max: f32, total: f64, weighted: f64) -> f32 {
    if total <= 0.0 {
        return max;
    }
    (max as f64 + weighted / total) as f32
}

/// `Σ w·(logit - max)` over tokens with `w > 0`, in vectorisable lanes.
fn weighted_logit_sum(weights: &[f32], logits: &[f32], max: f32) -> f64 {
    lane_sum(
        weights,
        logits,
        |w, l| if w > 0.0 { w * (l - max) } else { 0.0 },
    )
}

/// Σ `weights[i]` over the tokens whose key passes `inside`, in vectorisable lanes.
fn mass_where(keys: &[f32], weights: &[f32], inside: impl Fn(f32) -> bool) -> f64 {
    lane_sum(keys, weights, |k, w| if inside(k) { w } else { 0.0 })
}

/// Σ `term(a[i], b[i])`: f32 sums in independent lanes (zips, so no bounds checks), which the
/// compiler turns into vector code, folded in f64 at the end.
fn lane_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += term(x, y);
        }
    }
    let tail = a.len().min(b.len()) / LANES * LANES;
    let rest: f64 = a[tail..]
        .iter()
        .zip(&b[tail..])
        .map(|(&x, &y)| term(x, y) as f64)
        .sum();
    acc.iter().map(|&s| s as f64).sum::<f64>() + rest
}

/// f32 → u32 preserving the order of non-NaN floats, so a bisection can run on integers.
fn ordered_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn from_ordered_bits(u: u32) -> f32 {
    f32::from_bits(if u >> 31 == 1 { u & 0x7FFF_FFFF } else { !u })
}

/// Keeps (zeroes all other `weights`) the smallest set of tokens, in order of ascending key
/// then ascending id, whose weight reaches `target`: at least one token with weight > 0.
///
/// Rather than sorting the vocabulary, it bisects on the key threshold (32 vectorised passes)
/// and breaks ties at the threshold by id.
fn keep_smallest_mass(keys: &[f32], weights: &mut [f32], target: f64) {
    let enough = |m: f64| m >= target && m > 0.0;
    let (mut lo, mut hi) = (ordered_bits(f32::NEG_INFINITY), ordered_bits(f32::INFINITY));
    if !enough(mass_where(keys, weights, |k| k <= f32::INFINITY)) {
        // Rounding left the target out of reach: keep everything.
        return;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let t = from_ordered_bits(mid);
        if enough(mass_where(keys, weights, |k| k <= t)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let t = from_ordered_bits(lo);
    let below = mass_where(keys, weights, |k| k < t);
    let mut acc = below;
    let mut full = false;
    for (&k, w) in keys.iter().zip(weights.iter_mut()) {
        if k < t {
            continue;
        }
        if k == t && !full {
            acc += *w as f64;
            full = enough(acc);
        } else {
            *w = 0.0;
        }
    }
}

/// Cuts sorted `cands` after the first prefix whose weight reaches `target` (at least one).
fn truncate_at_mass(cands: &mut Vec<u32>, weights: &[f32], target: f64) {
    let mut acc = 0.0f64;
    for (j, &c) in cands.iter().enumerate() {
        acc += weights[c as usize] as f64;
        if acc >= target && acc > 0.0 {
            cands.truncate(j + 1);
            return;
        }
    }
}

/// The `k` ids with the highest `values` into `out`, descending, ties by ascending id.
///
/// Small `k` (top-n, usual top-k) keeps a sorted buffer and skips, 16 at a time, the values
/// that cannot enter it: one vectorised pass. Large `k` selects, then sorts the k.
fn top_ids(values: &[f32], k: usize, buf: &mut Vec<(u32, f32)>, out: &mut Vec<u32>) {
    let k = k.min(values.len());
    out.clear();
    if k == 0 {
        return;
    }
    if k > SMALL_TOP_N {
        let by_value_desc = |a: &u32, b: &u32| {
            values[*b as usize]
                .total_cmp(&values[*a as usize])
                .then(a.cmp(b))
        };
        out.extend(0..values.len() as u32);
        if k < values.len() {
            out.select_nth_unstable_by(k - 1, by_value_desc);
            out.truncate(k);
        }
        out.sort_unstable_by(by_value_desc);
        return;
    }
    buf.clear();
    let offer = |buf: &mut Vec<(u32, f32)>, id: usize, v: f32| {
        if v.is_nan() || (buf.len() == k && v <= buf[k - 1].1) {
            return;
        }
        let pos = buf.partition_point(|&(_, t)| t >= v);
        buf.insert(pos, (id as u32, v));
        buf.truncate(k);
    };
    let tail = values.len() - values.len() % LANES;
    for (c, chunk) in values.chunks_exact(LANES).enumerate() {
        if buf.len() == k {
            let threshold = buf[k - 1].1;
            if !chunk.iter().fold(false, |any, &v| any | (v > threshold)) {
                continue;
            }
        }
        for (j, &v) in chunk.iter().enumerate() {
            offer(buf, c * LANES + j, v);
        }
    }
    for (j, &v) in values[tail..].iter().enumerate() {
        offer(buf, tail + j, v);
    }
    out.extend(buf.iter().map(|&(id, _)| id));
}

/// xoshiro256** (Blackman & Vigna), seeded through SplitMix64: small, fast, and its stream is
/// fixed by this code rather than by a crate version.
#[derive(Debug, Clone)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for word in &mut s {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *word = z ^ (z >> 31);
        }
        Self { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> SamplingParams {
        SamplingParams::default()
    }

    fn sampling(seed: u64) -> SamplingParams {
        SamplingParams {
            do_sample: true,
            seed,
            ..SamplingParams::default()
        }
    }

    fn log_softmax(logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        logits.iter().map(|&l| l - max - z.ln() as f32).collect()
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        log_softmax(logits)
            .iter()
            .map(|&l| (l as f64).exp())
            .collect()
    }

    /// A deterministic pseudo-random logits vector (independent of the sampler's RNG).
    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256StarStar::seed_from_u64(seed ^ 0xABCD);
        (0..n)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 8.0)
            .collect()
    }

    fn draw_counts(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(params, &[]);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            let mut l = logits.to_vec();
            counts[sampler.next(&mut l, 0).id as usize] += 1;
        }
        counts
    }

    /// Pearson's chi-square of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], expected: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(expected)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_id_on_ties() {
        let mut s = Sampler::new(greedy(), &[]);
        let logits = [1.0, 3.0, 3.0, 2.0];
        let out = s.next(&mut logits.clone(), 0);
        assert_eq!(out.id, 1);
        assert!((out.logprob - log_softmax(&logits)[1]).abs() < 1e-6);
        assert!(out.top.is_empty());
    }

    #[test]
    fn greedy_ignores_temperature_for_logprobs() {
        let params = SamplingParams {
            temperature: 0.5,
            ..greedy()
        };
        let logits = [0.0, 1.0, 0.5];
        let out = Sampler::new(params, &[]).next(&mut logits.clone(), 0);
        assert_eq!(out.id, 1);
        assert!((out.logprob - log_softmax(&logits)[1]).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let params = SamplingParams {
            repetition_penalty: 1.2,
            ..greedy()
        };
        // 2.0 / 1.2 = 1.67 < 1.9: the prompt token loses.
        let mut s = Sampler::new(params.clone(), &[0]);
        let mut logits = [2.0, 1.9, -1.0];
        assert_eq!(s.next(&mut logits, 0).id, 1);
        assert!((logits[0] - 2.0 / 1.2).abs() < 1e-6);
        // -1.0 * 1.2 = -1.2 < -1.1.
        let mut s = Sampler::new(params.clone(), &[0]);
        assert_eq!(s.next(&mut [-1.0, -1.1], 0).id, 1);
        // Generated tokens are penalised too, and only once however often they appear.
        let mut s = Sampler::new(params, &[5, 5, 5]);
        assert_eq!(s.next(&mut [2.0, 1.9, 0.0, 0.0, 0.0, 0.0], 0).id, 0);
        let mut logits = [2.0, 1.9, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(s.next(&mut logits, 0).id, 1);
        assert!((logits[0] - 2.0 / 1.2).abs() < 1e-6);
    }

    #[test]
    fn frequency_penalty_grows_with_count_over_generated_tokens_only() {
        let params = SamplingParams {
            frequency_penalty: 0.6,
            ..greedy()
        };
        // The prompt does not count: token 0 still wins the first step.
        let mut s = Sampler::new(params, &[0, 0, 0]);
        let ids: Vec<u32> = (0..4).map(|_| s.next(&mut [2.0, 1.5, 0.0], 0).id).collect();
        // 2.0 > 1.5; 1.4 < 1.5; 1.4 > 0.9; 0.8 < 0.9.
        assert_eq!(ids, vec![0, 1, 0, 1]);
        assert_eq!(s.generated_count(0), 2);
    }

    #[test]
    fn presence_penalty_is_subtracted_once_per_generated_token() {
        let params = SamplingParams {
            presence_penalty: 0.6,
            ..greedy()
        };
        let mut s = Sampler::new(params, &[]);
        let ids: Vec<u32> = (0..4).map(|_| s.next(&mut [2.0, 1.5, 0.0], 0).id).collect();
        // 2.0 > 1.5; 1.4 < 1.5; then 1.4 > 0.9 for ever.
        assert_eq!(ids, vec![0, 1, 0, 0]);
    }

    #[test]
    fn penalties_ignore_ids_outside_the_vocabulary() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 1.0,
            ..greedy()
        };
        let mut s = Sampler::new(params, &[1000]);
        assert_eq!(s.next(&mut [0.0, 1.0], 0).id, 1);
    }

    #[test]
    fn tiny_temperature_behaves_like_argmax() {
        let logits = [1.0, 1.2, 0.5, 1.19];
        for seed in 0..50 {
            let params = SamplingParams {
                temperature: 1e-3,
                ..sampling(seed)
            };
            assert_eq!(Sampler::new(params, &[]).next(&mut logits.clone(), 0).id, 1);
        }
        // Temperature 0 with do_sample is the limit: greedy, no division by zero.
        let params = SamplingParams {
            temperature: 0.0,
            ..sampling(1)
        };
        let out = Sampler::new(params, &[]).next(&mut logits.clone(), 0);
        assert_eq!(out.id, 1);
        assert!(out.logprob.is_finite());
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        for seed in 0..20 {
            let logits = random_logits(500, seed);
            let want = Sampler::new(greedy(), &[]).next(&mut logits.clone(), 0).id;
            let top_k = SamplingParams {
                top_k: 1,
                ..sampling(seed)
            };
            let top_p = SamplingParams {
                top_p: 1e-6,
                ..sampling(seed)
            };
            assert_eq!(
                Sampler::new(top_k, &[]).next(&mut logits.clone(), 0).id,
                want
            );
            assert_eq!(
                Sampler::new(top_p, &[]).next(&mut logits.clone(), 0).id,
                want
            );
        }
    }

    #[test]
    fn a_seed_fixes_the_stream() {
        let logits = random_logits(1000, 7);
        let stream = |seed| -> Vec<u32> {
            let mut s = Sampler::new(sampling(seed), &[]);
            (0..64).map(|_| s.next(&mut logits.clone(), 0).id).collect()
        };
        assert_eq!(stream(42), stream(42));
        assert_ne!(stream(42), stream(43));
    }

    #[test]
    fn rng_is_xoshiro256starstar_seeded_by_splitmix64() {
        // SplitMix64's first outputs from state 0 (reference values of Vigna's splitmix64.c).
        let rng = Xoshiro256StarStar::seed_from_u64(0);
        assert_eq!(rng.s[0], 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.s[1], 0x6E78_9E6A_A1B9_65F4);
        // xoshiro256**'s first output is rotl(s1 * 5, 7) * 9.
        let mut rng = rng;
        let want = 0x6E78_9E6A_A1B9_65F4u64
            .wrapping_mul(5)
            .rotate_left(7)
            .wrapping_mul(9);
        assert_eq!(rng.next_u64(), want);
        let u = rng.next_f64();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn draws_follow_the_softmax() {
        let logits = [0.0, 1.0, 2.0, 0.5, -1.0];
        let counts = draw_counts(sampling(3), &logits, 20_000);
        // 4 degrees of freedom: P(chi2 > 30) < 1e-5; with a fixed seed it never flakes.
        assert!(chi_square(&counts, &softmax(&logits)) < 30.0, "{counts:?}");
        // The test can fail: a uniform expectation is far off.
        assert!(chi_square(&counts, &[0.2; 5]) > 1000.0);
    }

    #[test]
    fn temperature_scales_the_distribution() {
        let logits = [0.0, 1.0, 2.0, 0.5, -1.0];
        let params = SamplingParams {
            temperature: 2.0,
            ..sampling(11)
        };
        let counts = draw_counts(params.clone(), &logits, 20_000);
        let scaled: Vec<f32> = logits.iter().map(|l| l / 2.0).collect();
        assert!(chi_square(&counts, &softmax(&scaled)) < 30.0, "{counts:?}");
        assert!(chi_square(&counts, &softmax(&logits)) > 100.0);
        // The chosen token's logprob is that of the tempered distribution.
        let out = Sampler::new(params, &[]).next(&mut logits.clone(), 0);
        let want = log_softmax(&scaled)[out.id as usize];
        assert!((out.logprob - want).abs() < 1e-5);
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        let logits = [0.0, 1.0, 2.0, 0.5, -1.0];
        let params = SamplingParams {
            top_k: 2,
            ..sampling(5)
        };
        let counts = draw_counts(params, &logits, 10_000);
        assert_eq!(counts[0] + counts[3] + counts[4], 0, "{counts:?}");
        let expected = softmax(&[
            f32::NEG_INFINITY,
            1.0,
            2.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ]);
        assert!(chi_square(&counts, &expected) < 30.0, "{counts:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probs 0.5, 0.25, 0.125, 0.125: top_p 0.7 keeps {0, 1}; 0.75 too (0.5 + 0.25 ≥ 0.75).
        let logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        for top_p in [0.7, 0.75] {
            let params = SamplingParams {
                top_p,
                ..sampling(9)
            };
            let counts = draw_counts(params, &logits, 6_000);
            assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
            let expected = [2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0];
            assert!(chi_square(&counts, &expected) < 30.0, "{counts:?}");
        }
        // 0.8 needs a third token: of the tied 1/8s the lower id; 0.9 needs all four.
        for (top_p, kept) in [(0.8, 3), (0.9, 4)] {
            let params = SamplingParams {
                top_p,
                ..sampling(9)
            };
            let counts = draw_counts(params, &logits, 6_000);
            assert!(counts[..kept].iter().all(|&c| c > 0), "{counts:?}");
            assert!(counts[kept..].iter().all(|&c| c == 0), "{counts:?}");
        }
    }

    #[test]
    fn top_p_over_a_flat_vocabulary_keeps_exactly_the_nucleus() {
        // 1000 nearly equal tokens: hundreds are kept, cut exactly where the mass reaches p.
        let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 1e-3).collect();
        let probs = softmax(&logits);
        let top_p = 0.5;
        let mut acc = 0.0;
        let kept = probs
            .iter()
            .position(|&p| {
                acc += p;
                acc >= top_p
            })
            .unwrap()
            + 1;
        assert!(kept > 300);
        let params = SamplingParams {
            top_p: top_p as f32,
            ..sampling(2)
        };
        let counts = draw_counts(params, &logits, 20_000);
        assert!(counts[kept..].iter().all(|&c| c == 0));
        assert!(counts[kept - 20..kept].iter().any(|&c| c > 0));
        assert!(counts[..kept].iter().filter(|&&c| c == 0).count() < kept / 10);
    }

    #[test]
    fn typical_p_keeps_the_tokens_closest_to_the_entropy() {
        // probs 1/2, 1/4, 1/8, 1/8: H = 1.75 bits; |-log2 p - H| = 0.75, 0.25, 1.25, 1.25.
        // Typical order: 1, 0, {2, 3}. typical_p 0.2 keeps only token 1, not the argmax.
        let logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        let params = SamplingParams {
            typical_p: 0.2,
            ..sampling(4)
        };
        let counts = draw_counts(params, &logits, 500);
        assert_eq!(counts, vec![0, 500, 0, 0]);
        // 0.7 keeps {1, 0} (0.25 + 0.5 ≥ 0.7), renormalised 1/3 : 2/3.
        let params = SamplingParams {
            typical_p: 0.7,
            ..sampling(4)
        };
        let counts = draw_counts(params, &logits, 6_000);
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        assert!(chi_square(&counts, &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0]) < 30.0);
    }

    #[test]
    fn logprobs_are_normalised_and_top_n_is_descending() {
        let logits = [0.1, 3.0, 2.0, 3.0, -1.0];
        let lsm = log_softmax(&logits);
        let out = Sampler::new(greedy(), &[]).next(&mut logits.clone(), 3);
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        for (id, lp) in &out.top {
            assert!((lp - lsm[*id as usize]).abs() < 1e-6);
        }
        // Every token's logprob: they sum to one and include the chosen one.
        let out = Sampler::new(sampling(8), &[]).next(&mut logits.clone(), 100);
        assert_eq!(out.top.len(), logits.len());
        let total: f64 = out.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let chosen = out.top.iter().find(|t| t.0 == out.id).unwrap();
        assert_eq!(chosen.1, out.logprob);
    }

    #[test]
    fn top_n_small_and_large_paths_agree_with_a_full_sort() {
        let logits = random_logits(300, 1);
        let mut order: Vec<u32> = (0..300).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        for n in [1, 5, SMALL_TOP_N, SMALL_TOP_N + 1, 100] {
            let out = Sampler::new(greedy(), &[]).next(&mut logits.clone(), n);
            let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
            assert_eq!(ids, order[..n], "n = {n}");
        }
    }

    #[test]
    fn logprob_of_is_log_softmax() {
        let logits = [1.0, 2.0, 3.0];
        let want = 3.0 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((logprob_of(&logits, 2) - want).abs() < 1e-6);
        let logits = random_logits(1001, 3);
        let lsm = log_softmax(&logits);
        for id in [0, 500, 1000] {
            assert!((logprob_of(&logits, id) - lsm[id as usize]).abs() < 1e-5);
        }
        assert_eq!(logprob_of(&logits, 1001), f32::NEG_INFINITY);
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let mut s = Sampler::new(sampling(1), &[]);
        let out = s.next(&mut [f32::NEG_INFINITY; 4], 2);
        assert_eq!(out.id, 0);
        let out = s.next(&mut [], 2);
        assert_eq!(out.logprob, f32::NEG_INFINITY);
        // Masked (-inf) tokens are never drawn.
        let counts = draw_counts(
            sampling(6),
            &[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0],
            2_000,
        );
        assert_eq!(counts[0] + counts[2], 0);
    }

    #[test]
    fn top_k_path_applies_top_p_and_typical_p_like_the_dense_path() {
        // Same hand-made distribution as above plus four negligible tokens that top-k drops.
        let mut logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        logits.extend([-30.0; 4]);
        for (top_p, typical_p, kept) in [(0.7, 1.0, vec![0, 1]), (1.0, 0.2, vec![1])] {
            let params = SamplingParams {
                top_k: 4,
                top_p,
                typical_p,
                ..sampling(10)
            };
            let counts = draw_counts(params, &logits, 3_000);
            let drawn: Vec<usize> = (0..logits.len()).filter(|&i| counts[i] > 0).collect();
            assert_eq!(drawn, kept, "{counts:?}");
        }
    }

    #[test]
    fn smallest_mass_breaks_ties_by_id_and_keeps_at_least_one() {
        // Keys ascending = preference; ids 1 and 3 tie.
        let keys = [3.0, 1.0, 0.0, 1.0, 2.0];
        let weights = [0.1, 0.2, 0.3, 0.2, 0.2];
        let kept = |target: f64| -> Vec<usize> {
            let mut w = weights;
            keep_smallest_mass(&keys, &mut w, target);
            (0..5).filter(|&i| w[i] > 0.0).collect()
        };
        assert_eq!(kept(0.0), vec![2]);
        assert_eq!(kept(0.3), vec![2]);
        assert_eq!(kept(0.4), vec![1, 2]);
        assert_eq!(kept(0.6), vec![1, 2, 3]);
        assert_eq!(kept(0.75), vec![1, 2, 3, 4]);
        assert_eq!(kept(2.0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut x = 0.0f32;
        while x > -100.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if x >= -87.0 {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert_eq!(got, 0.0);
            }
            x -= 0.013;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }
}
