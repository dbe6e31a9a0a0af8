//! The lane-wise numeric helpers the sampler is built from: maxima, exponentials and sums over
//! vocabulary-sized slices in fixed lanes (so the compiler vectorises them and every run sums in
//! the same order), mass-based truncation and top-k selection.

use wick_kernels::leveled;

/// Up to this many tokens, top-n and top-k keep a small sorted buffer instead of a selection.
pub(super) const SMALL_TOP_N: usize = 64;

/// Accumulator lanes of the vocabulary-wide loops: independent sums the compiler vectorises.
pub(super) const LANES: usize = 16;

leveled!(
    /// Largest non-NaN value (-inf when there is none). Lanes let the compiler vectorise it.
    pub(super) fn max_of, max_of_at(xs: &[f32]) -> f32 = max_of_lanes
);
leveled!(
    /// First index holding `value` (0 if none), scanning 16 at a time with a vectorised test.
    pub(super) fn first_index_of, first_index_of_at(xs: &[f32], value: f32) -> u32 = first_index_of_lanes
);
leveled!(
    /// `out[i] = exp(logits[i] - max)`.
    pub(super) fn exp_shifted, exp_shifted_at(logits: &[f32], max: f32, out: &mut [f32]) -> () = exp_shifted_lanes
);
leveled!(
    /// Sum in f32 lanes (vectorisable), folded in f64: exact enough for a softmax normaliser.
    pub(super) fn sum_f64, sum_f64_at(xs: &[f32]) -> f64 = sum_f64_lanes
);
leveled!(
    /// `Σ exp(logits[i] - max)`, as [`sum_f64`] of [`exp_shifted`] (the same bits) without
    /// storing the exponentials: what a softmax's normaliser needs when nothing else does.
    pub(super) fn exp_sum, exp_sum_at(logits: &[f32], max: f32) -> f64 = exp_sum_lanes
);

/// A chunk of [`LANES`] values as an array: loops over it index fixed lanes, which the compiler
/// keeps in vector registers (iterator adapters over the slice were left as calls, per chunk,
/// in the functions compiled for a level).
#[inline(always)]
fn lanes(chunk: &[f32]) -> &[f32; LANES] {
    chunk.try_into().expect("chunks of LANES")
}

#[inline(always)]
fn exp_sum_lanes(logits: &[f32], max: f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks.map(lanes) {
        for i in 0..LANES {
            acc[i] += exp_nonpositive(chunk[i] - max);
        }
    }
    acc.iter()
        .copied()
        .chain(rest.iter().map(|&l| exp_nonpositive(l - max)))
        .map(|x| x as f64)
        .sum()
}

#[inline(always)]
fn max_of_lanes(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks.map(lanes) {
        for i in 0..LANES {
            acc[i] = acc[i].max(chunk[i]);
        }
    }
    let mut max = rest.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for a in acc {
        max = max.max(a);
    }
    max
}

#[inline(always)]
fn first_index_of_lanes(xs: &[f32], value: f32) -> u32 {
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

#[inline(always)]
fn exp_shifted_lanes(logits: &[f32], max: f32, out: &mut [f32]) {
    let n = out.len().min(logits.len());
    let whole = n / LANES * LANES;
    let (out, tail_out) = out[..n].split_at_mut(whole);
    let (logits, tail) = logits[..n].split_at(whole);
    // Indexed, not zipped: a zip of the two chunk iterators stays a call per chunk too.
    for at in (0..whole).step_by(LANES) {
        let l = lanes(&logits[at..at + LANES]);
        let o: &mut [f32; LANES] = (&mut out[at..at + LANES]).try_into().expect("LANES");
        for i in 0..LANES {
            o[i] = exp_nonpositive(l[i] - max);
        }
    }
    for (o, &l) in tail_out.iter_mut().zip(tail) {
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
pub(super) fn exp_nonpositive(x: f32) -> f32 {
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

#[inline(always)]
fn sum_f64_lanes(xs: &[f32]) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks.map(lanes) {
        for i in 0..LANES {
            acc[i] += chunk[i];
        }
    }
    acc.iter().chain(rest).map(|&x| x as f64).sum()
}

/// First id whose cumulative weight exceeds `target`; the last positive one if rounding leaves
/// `target` out of reach.
pub(super) fn draw(weights: impl Iterator<Item = (usize, f32)>, target: f64) -> u32 {
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
pub(super) fn entropy_shift(max: f32, total: f64, weighted: f64) -> f32 {
    if total <= 0.0 {
        return max;
    }
    (max as f64 + weighted / total) as f32
}

/// `Σ w·(logit - max)` over tokens with `w > 0`, in vectorisable lanes.
pub(super) fn weighted_logit_sum(weights: &[f32], logits: &[f32], max: f32) -> f64 {
    lane_sum(
        weights,
        logits,
        |w, l| if w > 0.0 { w * (l - max) } else { 0.0 },
    )
}

/// Σ `weights[i]` over the tokens whose key passes `inside`, in vectorisable lanes.
pub(super) fn mass_where(keys: &[f32], weights: &[f32], inside: impl Fn(f32) -> bool) -> f64 {
    lane_sum(keys, weights, |k, w| if inside(k) { w } else { 0.0 })
}

/// Σ `term(a[i], b[i])`: f32 sums in independent lanes, which the compiler turns into vector
/// code, folded in f64 at the end.
pub(super) fn lane_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    let tail = a.len().min(b.len()) / LANES * LANES;
    // Indexed, not zipped (see `exp_shifted_lanes`).
    for at in (0..tail).step_by(LANES) {
        let (ca, cb) = (lanes(&a[at..at + LANES]), lanes(&b[at..at + LANES]));
        for i in 0..LANES {
            acc[i] += term(ca[i], cb[i]);
        }
    }
    let rest: f64 = a[tail..]
        .iter()
        .zip(&b[tail..])
        .map(|(&x, &y)| term(x, y) as f64)
        .sum();
    acc.iter().map(|&s| s as f64).sum::<f64>() + rest
}

/// f32 → u32 preserving the order of non-NaN floats, so a bisection can run on integers.
pub(super) fn ordered_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

pub(super) fn from_ordered_bits(u: u32) -> f32 {
    f32::from_bits(if u >> 31 == 1 { u & 0x7FFF_FFFF } else { !u })
}

/// Keeps (zeroes all other `weights`) the smallest set of tokens, in order of ascending key
/// then ascending id, whose weight reaches `target`: at least one token with weight > 0.
///
/// Rather than sorting the vocabulary, it bisects on the key threshold (32 vectorised passes)
/// and breaks ties at the threshold by id.
pub(super) fn keep_smallest_mass(keys: &[f32], weights: &mut [f32], target: f64) {
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
pub(super) fn truncate_at_mass(cands: &mut Vec<u32>, weights: &[f32], target: f64) {
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
pub(super) fn top_ids(values: &[f32], k: usize, buf: &mut Vec<(u32, f32)>, out: &mut Vec<u32>) {
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
