//! Activations quantized to 8-bit blocks, once per step, for every matrix that reads them.

use rayon::prelude::*;

use crate::format::BLOCK;
use crate::Level;

/// `[rows, k]` f32 activations as blocks of 32 `i8` with one f32 scale each
/// (`x ≈ scale · q`, `|q| ≤ 127`), each block's integer sum `Σq`, which the offset formats
/// (Q4_0's −8, Q4_1's and Q4_K's minimums) need, and the sum of its first 16 quants (Q6_K
/// has a scale per 16).
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    rows: usize,
    k: usize,
    pub(crate) qs: Vec<i8>,
    pub(crate) scales: Vec<f32>,
    pub(crate) sums: Vec<i32>,
    pub(crate) half_sums: Vec<i32>,
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
        q.requantize(level, x, rows, k);
        q
    }

    /// As [`QuantizedRows::quantize_at`], reusing this value's buffers.
    pub fn requantize(&mut self, level: Level, x: &[f32], rows: usize, k: usize) {
        assert!(
            k.is_multiple_of(BLOCK),
            "k = {k} is not a multiple of {BLOCK}"
        );
        assert_eq!(x.len(), rows * k, "activation size");
        let blocks = rows * k / BLOCK;
        self.rows = rows;
        self.k = k;
        self.qs.resize(rows * k, 0);
        self.scales.resize(blocks, 0.0);
        self.sums.resize(blocks, 0);
        self.half_sums.resize(blocks, 0);
        // Runs of 64 blocks per task: a decode row is one or a few tasks, a prefill many.
        const RUN: usize = 64;
        let level = level.capped();
        self.qs
            .par_chunks_mut(RUN * BLOCK)
            .zip(self.scales.par_chunks_mut(RUN))
            .zip(self.sums.par_chunks_mut(RUN))
            .zip(self.half_sums.par_chunks_mut(RUN))
            .zip(x.par_chunks(RUN * BLOCK))
            .for_each(|((((qs, scales), sums), half_sums), x)| {
                for ((((q, scale), sum), half), x) in qs
                    .chunks_exact_mut(BLOCK)
                    .zip(scales.iter_mut())
                    .zip(sums.iter_mut())
                    .zip(half_sums.iter_mut())
                    .zip(x.chunks_exact(BLOCK))
                {
                    (*sum, *half) = match level {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `capped` only yields levels the CPU runs; the block sizes
                        // are exact (`chunks_exact`).
                        Level::Avx512 => unsafe {
                            crate::x86::activation::quantize_block_avx512(x, q, scale)
                        },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above.
                        Level::Avx2 => unsafe {
                            crate::x86::activation::quantize_block_avx2(x, q, scale)
                        },
                        _ => quantize_block(x, q, scale),
                    };
                }
            });
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `r`'s quants.
    pub(crate) fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }

    /// Row `r`'s block scales.
    pub(crate) fn row_scales(&self, r: usize) -> &[f32] {
        let nb = self.k / BLOCK;
        &self.scales[r * nb..(r + 1) * nb]
    }

    /// Row `r`'s block sums.
    pub(crate) fn row_sums(&self, r: usize) -> &[i32] {
        let nb = self.k / BLOCK;
        &self.sums[r * nb..(r + 1) * nb]
    }

    /// Row `r`'s sums of the first half of each block.
    pub(crate) fn row_half_sums(&self, r: usize) -> &[i32] {
        let nb = self.k / BLOCK;
        &self.half_sums[r * nb..(r + 1) * nb]
    }

    /// Row `r` as f32, as the kernels see it (`scale · q`).
    pub fn dequantized_row(&self, r: usize) -> Vec<f32> {
        self.row_qs(r)
            .chunks_exact(BLOCK)
            .zip(self.row_scales(r))
            .flat_map(|(q, &d)| q.iter().map(move |&v| d * v as f32))
            .collect()
    }
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
            assert_eq!(q.scales[b], amax / 127.0);
            let qs = &q.qs[b * BLOCK..(b + 1) * BLOCK];
            assert_eq!(q.sums[b], qs.iter().map(|&v| v as i32).sum::<i32>());
            assert_eq!(
                q.half_sums[b],
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
            assert_eq!(got.qs, want.qs, "{level}");
            assert!(same_bits(&got.scales, &want.scales), "{level}");
            assert_eq!(got.sums, want.sums, "{level}");
            assert_eq!(got.half_sums, want.half_sums, "{level}");
        }
    }

    #[test]
    fn a_zero_block_has_zero_scale_and_quants() {
        let q = QuantizedRows::quantize(&[0.0; 64], 2, 32);
        assert_eq!(q.scales, vec![0.0, 0.0]);
        assert!(q.qs.iter().all(|&v| v == 0));
    }
}
