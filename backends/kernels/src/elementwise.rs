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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::same_bits;

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
