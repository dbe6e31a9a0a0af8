//! Element-wise activations of the MLP, vectorised, on the same `exp` as the attention.

use crate::attention::exp;
use crate::Level;

/// `out = SiLU(gate) · up` element by element, at `level` (lowered to what the CPU has);
/// every level gives the same bits.
///
/// `SiLU(g) = g / (1 + e^-g)` is computed from `e = exp(-|g|)`, which never overflows:
/// `g / (1 + e)` for `g ≥ 0`, `g·e / (1 + e)` below.
///
/// # Panics
/// If the three slices differ in length.
pub fn silu_mul(level: Level, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "silu_mul: {} gate, {} up and {} output floats",
        gate.len(),
        up.len(),
        out.len()
    );
    match level.capped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `capped` only yields levels the CPU runs; the lengths were checked.
        Level::Avx512 => unsafe { crate::x86::elementwise::silu_mul_avx512(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::elementwise::silu_mul_avx2(gate, up, out) },
        _ => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = silu(g) * u;
            }
        }
    }
}

/// The scalar twin of one element.
pub(crate) fn silu(g: f32) -> f32 {
    let e = exp(-g.abs());
    if g >= 0.0 {
        g / (1.0 + e)
    } else {
        g * e / (1.0 + e)
    }
}

/// Partial sums of [`add_rms_norm`]'s sum of squares (element `i` to lane `i % 16`).
const NORM_LANES: usize = 16;

crate::leveled!(
    /// One row's residual add and RMS norm: `sum = x + delta` (just `x` without `delta`) and
    /// `out = sum / sqrt(mean(sum²) + eps) · weight` (candle's `rms_norm` expression), at
    /// `level` (lowered to what the CPU has).
    ///
    /// The mean of squares keeps 16 partial sums (element `i` to lane `i % 16`), added up in
    /// lane order; the rest is element by element. The SIMD levels are this code compiled for
    /// wider vectors (see [`crate::leveled`]), so every level gives the same bits.
    ///
    /// # Panics
    /// If the slices differ in length.
    pub fn add_rms_norm(
        x: &[f32],
        delta: Option<&[f32]>,
        weight: &[f32],
        eps: f32,
        sum: &mut [f32],
        out: &mut [f32]
    ) -> () = add_rms_norm_lanes
);

/// [`add_rms_norm`]'s code, which each level compiles for its vectors: plain indexed loops
/// over slices cut to one length (no bounds checks, no iterator adapters left uninlined).
#[inline(always)]
fn add_rms_norm_lanes(
    x: &[f32],
    delta: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    sum: &mut [f32],
    out: &mut [f32],
) {
    let n = x.len();
    assert!(
        weight.len() == n && sum.len() == n && out.len() == n && delta.is_none_or(|d| d.len() == n),
        "add_rms_norm: rows of {n}, weight {}, outputs {} and {}",
        weight.len(),
        sum.len(),
        out.len()
    );
    let (weight, sum, out) = (&weight[..n], &mut sum[..n], &mut out[..n]);
    match delta {
        Some(d) => {
            let d = &d[..n];
            for i in 0..n {
                sum[i] = x[i] + d[i];
            }
        }
        None => sum.copy_from_slice(x),
    }
    let mut acc = [0f32; NORM_LANES];
    let whole = n / NORM_LANES * NORM_LANES;
    let mut at = 0;
    while at < whole {
        let chunk = &sum[at..at + NORM_LANES];
        for l in 0..NORM_LANES {
            acc[l] += chunk[l] * chunk[l];
        }
        at += NORM_LANES;
    }
    for l in 0..n - whole {
        acc[l] += sum[whole + l] * sum[whole + l];
    }
    let mut sum2 = 0f32;
    for a in acc {
        sum2 += a;
    }
    let m = (sum2 / n as f32 + eps).sqrt();
    for i in 0..n {
        out[i] = sum[i] / m * weight[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::same_bits;

    #[test]
    fn add_rms_norm_is_close_to_f64_and_every_level_gives_the_scalar_bits() {
        for n in [1, 15, 16, 17, 576, 2051] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.03)
                .collect();
            let d: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 29) as f32 - 14.0) * 0.2)
                .collect();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
            for delta in [None, Some(&d[..])] {
                let (mut sum, mut want) = (vec![0f32; n], vec![0f32; n]);
                add_rms_norm(Level::Scalar, &x, delta, &w, 1e-5, &mut sum, &mut want);
                let exact_sum: Vec<f64> = (0..n)
                    .map(|i| x[i] as f64 + delta.map_or(0.0, |d| d[i] as f64))
                    .collect();
                let ms = exact_sum.iter().map(|v| v * v).sum::<f64>() / n as f64;
                for i in 0..n {
                    assert_eq!(sum[i] as f64, (x[i] + delta.map_or(0.0, |d| d[i])) as f64);
                    let exact = exact_sum[i] / (ms + 1e-5).sqrt() * w[i] as f64;
                    assert!((want[i] as f64 - exact).abs() <= 1e-5 * exact.abs().max(1.0));
                }
                for level in Level::supported() {
                    let (mut s2, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                    add_rms_norm(level, &x, delta, &w, 1e-5, &mut s2, &mut got);
                    assert!(
                        same_bits(&got, &want) && same_bits(&s2, &sum),
                        "{level}, n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn silu_is_close_to_f64_and_every_level_gives_the_scalar_bits() {
        let gate: Vec<f32> = (0..1003)
            .map(|i| (i as f32 - 501.0) * 0.037)
            .chain([0.0, -0.0, 90.0, -90.0, 1e30, -1e30, f32::INFINITY])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 1.0 - (i % 7) as f32 * 0.3)
            .collect();
        let mut want = vec![0f32; gate.len()];
        silu_mul(Level::Scalar, &gate, &up, &mut want);
        for ((&g, &u), &w) in gate.iter().zip(&up).zip(&want).take(1003) {
            let exact = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (w as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "{g}: {w} vs {exact}"
            );
        }
        for level in Level::supported() {
            // Odd lengths: every tail of the vector loops.
            for len in [gate.len(), 1, 15, 17, 33] {
                let mut got = vec![f32::NAN; len];
                silu_mul(level, &gate[..len], &up[..len], &mut got);
                let same = same_bits(&got, &want[..len]);
                assert!(same, "{level}, length {len}");
            }
        }
    }
}
