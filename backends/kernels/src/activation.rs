//! Activations quantized to 8-bit blocks, once per step, for every matrix that reads them.
//!
//! A block whose largest value stands far above the rest (a residual-stream outlier channel,
//! often 15–30× its row's RMS in real models) sets a scale so coarse that the block's other
//! values keep only a few steps. Such a block is *refined*: its rounding error is quantized
//! again to a second 8-bit block, and the kernels add that block's product too, so the block
//! is carried at about 15 bits. Which blocks are refined follows from each row's own values,
//! so a row's result never depends on its batch.

use rayon::prelude::*;

use crate::format::BLOCK;
use crate::Level;

/// A block is refined when its largest value exceeds this many times its RMS, i.e. when
/// `Σq² < 32·127² / OUTLIER_RATIO²` over its quants (an integer test: every level decides
/// alike). Gaussian noise reaches 4.5× its block's RMS in fewer than one block in a thousand;
/// on SmolLM2 4.5 (rather than 4) keeps the refined blocks to 7–19% and the log-probability
/// difference to the f32 path at 0.040 nats (4: 12–26%, 0.037; 5: 2–12%, 0.056).
pub const OUTLIER_RATIO: f32 = 4.5;

/// What the quantization does with blocks that hold an outlier (see the module header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Outliers {
    /// Their rounding error takes a second 8-bit pass.
    #[default]
    Refine,
    /// Every block is 8-bit only, as llama.cpp's q8_0/q8_1 activations: faster where a model's
    /// activations have heavy tails, further from the f32 path.
    Plain,
}

/// `Σq²` below which a block is refined (see [`OUTLIER_RATIO`]).
const REFINE_BELOW: i32 = (BLOCK as f32 * 127.0 * 127.0 / (OUTLIER_RATIO * OUTLIER_RATIO)) as i32;

/// Quantized blocks of `[rows, k]` values: 32 `i8` with one f32 scale each (`x ≈ scale · q`,
/// `|q| ≤ 127`), each block's integer sum `Σq`, which the offset formats (Q4_0's −8, Q4_1's
/// and Q4_K's minimums) need, and the sum of its first 16 quants (Q6_K has a scale per 16).
#[derive(Debug, Clone, Default)]
pub(crate) struct Blocks {
    pub qs: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
    pub half_sums: Vec<i32>,
}

/// One row's part of [`Blocks`].
#[derive(Clone, Copy)]
pub(crate) struct RowBlocks<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
    pub half_sums: &'a [i32],
}

/// A run of consecutive blocks of [`Blocks`], written by one task.
struct BlocksMut<'a> {
    qs: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [i32],
    half_sums: &'a mut [i32],
}

impl Blocks {
    fn resize(&mut self, blocks: usize) {
        self.qs.resize(blocks * BLOCK, 0);
        self.scales.resize(blocks, 0.0);
        self.sums.resize(blocks, 0);
        self.half_sums.resize(blocks, 0);
    }

    /// Runs of `run` blocks, for the pool.
    fn par_runs_mut(&mut self, run: usize) -> impl IndexedParallelIterator<Item = BlocksMut<'_>> {
        (
            self.qs.par_chunks_mut(run * BLOCK),
            self.scales.par_chunks_mut(run),
            self.sums.par_chunks_mut(run),
            self.half_sums.par_chunks_mut(run),
        )
            .into_par_iter()
            .map(|(qs, scales, sums, half_sums)| BlocksMut {
                qs,
                scales,
                sums,
                half_sums,
            })
    }

    /// Blocks `first..first + count`.
    fn range(&self, first: usize, count: usize) -> RowBlocks<'_> {
        RowBlocks {
            qs: &self.qs[first * BLOCK..(first + count) * BLOCK],
            scales: &self.scales[first..first + count],
            sums: &self.sums[first..first + count],
            half_sums: &self.half_sums[first..first + count],
        }
    }
}

/// `[rows, k]` f32 activations as 8-bit [`Blocks`], with a second 8-bit pass over the rounding
/// error of the blocks that hold an outlier (see the module header).
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    rows: usize,
    k: usize,
    main: Blocks,
    /// Each block's rounding error quantized again where the block is refined; scale 0
    /// elsewhere (those blocks' quants are stale and never read).
    residual: Blocks,
    /// Each row's refined blocks (indices within the row), row after row.
    refined: Vec<u32>,
    /// Where each row's refined blocks start in `refined`, and where the last row's end.
    refined_start: Vec<u32>,
}

impl QuantizedRows {
    /// Quantizes row-major `x: [rows, k]`; `k` must be a multiple of 32.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        Self::quantize_at(Level::detected(), x, rows, k)
    }

    /// As [`QuantizedRows::quantize`] at `level` (lowered to what the CPU has); every level
    /// gives the same quants, scales and sums.
    pub fn quantize_at(level: Level, x: &[f32], rows: usize, k: usize) -> Self {
        let mut q = Self::default();
        q.requantize(level, Outliers::Refine, x, rows, k);
        q
    }

    /// As [`QuantizedRows::quantize_at`], reusing this value's buffers, with `outliers` saying
    /// whether blocks holding an outlier take a second pass.
    pub fn requantize(
        &mut self,
        level: Level,
        outliers: Outliers,
        x: &[f32],
        rows: usize,
        k: usize,
    ) {
        assert!(
            k.is_multiple_of(BLOCK),
            "k = {k} is not a multiple of {BLOCK}"
        );
        assert_eq!(x.len(), rows * k, "activation size");
        let blocks = rows * k / BLOCK;
        self.rows = rows;
        self.k = k;
        self.main.resize(blocks);
        self.residual.resize(blocks);
        // Runs of 64 blocks per task: a decode row is one or a few tasks, a prefill many.
        const RUN: usize = 64;
        let level = level.capped();
        let refine_outliers = outliers == Outliers::Refine;
        let runs = self
            .main
            .par_runs_mut(RUN)
            .zip(self.residual.par_runs_mut(RUN));
        runs.zip(x.par_chunks(RUN * BLOCK))
            .for_each(|((main, residual), x)| {
                for (i, x) in x.chunks_exact(BLOCK).enumerate() {
                    let q = &mut main.qs[i * BLOCK..(i + 1) * BLOCK];
                    (main.sums[i], main.half_sums[i]) =
                        quantize_block_at(level, x, q, &mut main.scales[i]);
                    if !refine_outliers {
                        continue;
                    }
                    let rq = &mut residual.qs[i * BLOCK..(i + 1) * BLOCK];
                    (residual.scales[i], residual.sums[i], residual.half_sums[i]) =
                        refine(level, x, q, main.scales[i], rq).unwrap_or_default();
                }
            });
        self.refined.clear();
        self.refined_start.clear();
        self.refined_start.push(0);
        if !refine_outliers {
            self.refined_start.resize(rows + 1, 0);
            return;
        }
        for row in self.residual.scales.chunks_exact(k / BLOCK).take(rows) {
            let refined = row.iter().enumerate().filter(|(_, &d)| d != 0.0);
            self.refined.extend(refined.map(|(b, _)| b as u32));
            self.refined_start.push(self.refined.len() as u32);
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `r`'s blocks.
    pub(crate) fn row(&self, r: usize) -> RowBlocks<'_> {
        let nb = self.k / BLOCK;
        self.main.range(r * nb, nb)
    }

    /// Row `r`'s second pass: scale 0 where a block is not refined (with [`Outliers::Plain`],
    /// stale: read only the blocks [`QuantizedRows::refined_in`] lists).
    pub(crate) fn residual_row(&self, r: usize) -> RowBlocks<'_> {
        let nb = self.k / BLOCK;
        self.residual.range(r * nb, nb)
    }

    /// Whether any of `rows` has refined blocks.
    pub(crate) fn any_refined(&self, rows: std::ops::Range<usize>) -> bool {
        self.refined_start[rows.end] > self.refined_start[rows.start]
    }

    /// Row `r`'s refined blocks, in order.
    pub(crate) fn refined_in(&self, r: usize) -> &[u32] {
        let (start, end) = (self.refined_start[r], self.refined_start[r + 1]);
        &self.refined[start as usize..end as usize]
    }

    /// Every row's blocks.
    pub(crate) fn main(&self) -> &Blocks {
        &self.main
    }

    /// Blocks refined over all rows (a block holding an outlier; see the module header).
    pub fn refined_blocks(&self) -> usize {
        self.refined.len()
    }

    /// Row `r` as f32, as the kernels see it (`scale · q`, plus the second pass where a block
    /// is refined).
    pub fn dequantized_row(&self, r: usize) -> Vec<f32> {
        let (main, residual) = (self.row(r), self.residual_row(r));
        let mut x: Vec<f32> = main
            .qs
            .chunks_exact(BLOCK)
            .zip(main.scales)
            .flat_map(|(q, &d)| q.iter().map(move |&v| d * v as f32))
            .collect();
        for &b in self.refined_in(r) {
            let (b, d) = (b as usize, residual.scales[b as usize]);
            let quants = &residual.qs[b * BLOCK..(b + 1) * BLOCK];
            for (x, &q) in x[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(quants) {
                *x += d * q as f32;
            }
        }
        x
    }
}

/// One block at `level` (every level gives the scalar twin's bits).
#[inline(always)]
fn quantize_block_at(level: Level, x: &[f32], q: &mut [i8], scale: &mut f32) -> (i32, i32) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a `capped` level, which the CPU runs; the blocks are whole.
        Level::Avx512 => unsafe { crate::x86::activation::quantize_block_avx512(x, q, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::activation::quantize_block_avx2(x, q, scale) },
        _ => quantize_block(x, q, scale),
    }
}

/// The second pass of a block quantized to `q` with scale `d`: when its quants show an outlier
/// (see [`OUTLIER_RATIO`]), its rounding error `x − d·q` quantized into `rq`, with that
/// block's scale and sums. The error is portable code at every level and its quantization
/// gives the same bits at every level, so every level refines alike.
#[inline(always)]
fn refine(level: Level, x: &[f32], q: &[i8], d: f32, rq: &mut [i8]) -> Option<(f32, i32, i32)> {
    let energy: i32 = q.iter().map(|&v| v as i32 * v as i32).sum();
    if energy >= REFINE_BELOW || !(d > 0.0 && d.is_finite()) {
        return None;
    }
    let mut error = [0f32; BLOCK];
    for ((e, &x), &q) in error.iter_mut().zip(x).zip(q) {
        *e = x - d * q as f32;
    }
    let mut scale = 0.0;
    let (sum, half) = quantize_block_at(level, &error, rq, &mut scale);
    // Not finite: `d·q` overflowed (a block near f32::MAX), no second pass.
    scale.is_finite().then_some((scale, sum, half))
}

/// One block: round-to-nearest onto `amax / 127` steps; returns `Σq` and the sum of the first
/// half's quants. The portable twin of the SIMD levels' blocks.
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8], scale: &mut f32) -> (i32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut halves = [0i32; 2];
    for ((q, x), sum) in q
        .chunks_exact_mut(BLOCK / 2)
        .zip(x.chunks_exact(BLOCK / 2))
        .zip(&mut halves)
    {
        for (q, &v) in q.iter_mut().zip(x) {
            // Half away from zero, then truncation: `round` without a libm call, so the loop
            // vectorises. `as` saturates and maps NaN to 0; |v·id| ≤ 127 up to rounding.
            let s = v * id;
            let r = ((s + 0.5f32.copysign(s)) as i32).clamp(-127, 127);
            *q = r as i8;
            *sum += r;
        }
    }
    *scale = d;
    (halves[0] + halves[1], halves[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{same_bits, Rng};

    #[test]
    fn blocks_round_to_their_own_scale() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let q = QuantizedRows::quantize(&x, 1, 96);
        for (b, block) in x.chunks(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(q.main.scales[b], amax / 127.0);
            let qs = &q.main.qs[b * BLOCK..(b + 1) * BLOCK];
            assert_eq!(q.main.sums[b], qs.iter().map(|&v| v as i32).sum::<i32>());
            assert_eq!(
                q.main.half_sums[b],
                qs[..16].iter().map(|&v| v as i32).sum::<i32>()
            );
            assert!(qs.iter().any(|&v| v.abs() == 127));
        }
        let back = q.dequantized_row(0);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 1.1 / 127.0 * 0.5 + 1e-6);
        }
    }

    #[test]
    fn every_level_quantizes_as_the_scalar_twin() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut x: Vec<f32> = (0..40 * BLOCK)
            .map(|i| rng.next() * 0.5 * [1.0, 1e-3, 40.0, 1e30][i / BLOCK % 4])
            .collect();
        // Ties onto the grid (127 · k/2 / 127 steps), signed zeros, NaN, infinities, a zero
        // block, one huge value.
        for (i, v) in x[..BLOCK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        x[BLOCK..2 * BLOCK].fill(-0.0);
        x[2 * BLOCK + 3] = f32::NAN;
        x[3 * BLOCK + 9] = f32::INFINITY;
        x[4 * BLOCK + 31] = f32::NEG_INFINITY;
        x[5 * BLOCK..6 * BLOCK].fill(0.0);
        x[6 * BLOCK] = f32::MAX;
        let want = QuantizedRows::quantize_at(Level::Scalar, &x, 4, 10 * BLOCK);
        for level in Level::supported() {
            let got = QuantizedRows::quantize_at(level, &x, 4, 10 * BLOCK);
            assert_eq!(got.main.qs, want.main.qs, "{level}");
            assert!(same_bits(&got.main.scales, &want.main.scales), "{level}");
            assert_eq!(got.main.sums, want.main.sums, "{level}");
            assert_eq!(got.main.half_sums, want.main.half_sums, "{level}");
            assert!(
                same_bits(&got.residual.scales, &want.residual.scales),
                "{level}"
            );
            assert_eq!(got.residual.qs, want.residual.qs, "{level}");
            assert_eq!(got.residual.sums, want.residual.sums, "{level}");
            assert_eq!(got.residual.half_sums, want.residual.half_sums, "{level}");
            assert_eq!(got.refined, want.refined, "{level}");
            assert_eq!(got.refined_start, want.refined_start, "{level}");
        }
        // The f32::MAX block would overflow its second pass: not refined, and nothing infinite.
        assert_eq!(want.residual.scales[6], 0.0);
        assert!(want.residual.scales.iter().all(|d| d.is_finite()));
    }

    #[test]
    fn plain_blocks_are_the_first_pass_alone() {
        let mut rng = Rng(22);
        let mut x: Vec<f32> = (0..8 * BLOCK).map(|_| rng.next()).collect();
        x[5] = 40.0;
        let refined = QuantizedRows::quantize(&x, 2, 4 * BLOCK);
        assert_eq!(refined.refined_blocks(), 1);
        let mut plain = QuantizedRows::default();
        plain.requantize(Level::detected(), Outliers::Plain, &x, 2, 4 * BLOCK);
        assert_eq!(plain.refined_blocks(), 0);
        assert_eq!(plain.main.qs, refined.main.qs);
        assert!(same_bits(&plain.main.scales, &refined.main.scales));
        assert!(plain.residual.scales.iter().all(|&d| d == 0.0));
        assert!((0..2).all(|r| plain.refined_in(r).is_empty()));
        // A buffer reused from a refined step keeps its stale second pass out of every result.
        let mut reused = refined.clone();
        reused.requantize(Level::detected(), Outliers::Plain, &x, 2, 4 * BLOCK);
        assert_eq!(reused.refined_blocks(), 0);
        assert_eq!(reused.dequantized_row(0), plain.dequantized_row(0));
    }

    #[test]
    fn a_block_with_an_outlier_is_carried_at_about_fifteen_bits() {
        let mut rng = Rng(21);
        let mut x: Vec<f32> = (0..4 * BLOCK).map(|_| rng.next()).collect();
        // Block 1: one value at 30× the others' scale (as a residual-stream outlier channel).
        x[BLOCK + 7] = 30.0;
        // Block 3: a large value, but only 3× the block's RMS: not an outlier.
        x[3 * BLOCK + 2] = 2.5;
        let q = QuantizedRows::quantize(&x, 2, 2 * BLOCK);
        assert_eq!(q.refined_in(0), [1]);
        assert!(q.any_refined(0..1) && !q.any_refined(1..2) && q.any_refined(0..2));
        assert!(q.refined_in(1).is_empty());
        assert_eq!(q.refined_blocks(), 1);
        assert!(q.residual.scales[1] > 0.0);
        assert_eq!(
            q.residual.sums[1],
            q.residual.qs[BLOCK..2 * BLOCK]
                .iter()
                .map(|&v| v as i32)
                .sum::<i32>()
        );
        for b in [0, 2, 3] {
            assert_eq!(q.residual.scales[b], 0.0, "block {b}");
        }
        let back = q.dequantized_row(0);
        // One 8-bit step of the outlier's block is 30/127; the second pass leaves at most
        // half a step of the error's own scale (≤ half a first step / 127).
        let first_step = 30.0 / 127.0;
        for (i, (a, b)) in x[BLOCK..2 * BLOCK].iter().zip(&back[BLOCK..]).enumerate() {
            assert!(
                (a - b).abs() <= first_step / 254.0 * 1.01,
                "element {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn a_zero_block_has_zero_scale_and_quants() {
        let q = QuantizedRows::quantize(&[0.0; 64], 2, 32);
        assert_eq!(q.main.scales, vec![0.0, 0.0]);
        assert!(q.main.qs.iter().all(|&v| v == 0));
    }
}
