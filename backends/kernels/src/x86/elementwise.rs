//! [`crate::elementwise`] with AVX-512 and AVX2: the scalar twin's operations in its order.

use std::arch::x86_64::*;

use super::attention::{exp16, exp8};
use crate::elementwise::silu;

/// # Safety
/// The CPU must have AVX-512F and FMA; the three slices have the same length.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len() / 16 * 16;
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let sign = _mm512_set1_epi32(i32::MIN);
    let one = _mm512_set1_ps(1.0);
    for at in (0..n).step_by(16) {
        let x = _mm512_loadu_ps(g.add(at));
        // -|g|: the sign bit set, as the scalar's negated absolute value.
        let neg_abs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), sign));
        let e = exp16(neg_abs);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        // g where g ≥ 0 (or NaN, which stays NaN either way), g·e below.
        let num = _mm512_mask_mul_ps(x, below, x, e);
        let s = _mm512_div_ps(num, _mm512_add_ps(one, e));
        _mm512_storeu_ps(o.add(at), _mm512_mul_ps(s, _mm512_loadu_ps(u.add(at))));
    }
    for i in n..out.len() {
        out[i] = silu(gate[i]) * up[i];
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA; the three slices have the same length.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len() / 8 * 8;
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let one = _mm256_set1_ps(1.0);
    for at in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(g.add(at));
        let neg_abs = _mm256_or_ps(x, sign);
        let e = exp8(neg_abs);
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
        let num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), below);
        let s = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o.add(at), _mm256_mul_ps(s, _mm256_loadu_ps(u.add(at))));
    }
    for i in n..out.len() {
        out[i] = silu(gate[i]) * up[i];
    }
}
