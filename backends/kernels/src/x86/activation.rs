//! [`crate::activation`]'s block quantization with AVX-512 and AVX2: the scalar twin's
//! operations (`|x|` maximum, `x · (127 / amax)`, half away from zero, truncation, clamp to
//! ±127, NaN to 0), so the same quants, scale and sums.

use std::arch::x86_64::*;

use crate::format::BLOCK;

/// The block's scale and its inverse, from `amax`, as the scalar twin computes them.
#[inline(always)]
fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// # Safety
/// The CPU must have AVX-512F; `x` and `q` hold one block each.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8], scale: &mut f32) -> (i32, i32) {
    debug_assert!(x.len() == BLOCK && q.len() == BLOCK);
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let halves = [
        _mm512_loadu_ps(x.as_ptr()),
        _mm512_loadu_ps(x.as_ptr().add(16)),
    ];
    // `max_ps` returns its second operand when either is NaN, which keeps the running
    // maximum, as `f32::max` does.
    let mut m = _mm512_setzero_ps();
    for v in halves {
        m = _mm512_max_ps(
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs)),
            m,
        );
    }
    let (d, id) = scales(_mm512_reduce_max_ps(m));
    let id = _mm512_set1_ps(id);
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_epi32(0.5f32.to_bits() as i32);
    let mut sums = [0i32; 2];
    for (h, v) in halves.into_iter().enumerate() {
        let s = _mm512_mul_ps(v, id);
        let t = _mm512_add_ps(
            s,
            _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(_mm512_castps_si512(s), sign),
                half,
            )),
        );
        let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t);
        let c = _mm512_min_ps(
            _mm512_max_ps(t, _mm512_set1_ps(-127.0)),
            _mm512_set1_ps(127.0),
        );
        let r = _mm512_maskz_cvttps_epi32(ordered, c);
        _mm_storeu_si128(
            q.as_mut_ptr().add(16 * h) as *mut __m128i,
            _mm512_cvtepi32_epi8(r),
        );
        sums[h] = _mm512_reduce_add_epi32(r);
    }
    *scale = d;
    (sums[0] + sums[1], sums[0])
}

#[target_feature(enable = "avx2")]
unsafe fn sum8(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// # Safety
/// The CPU must have AVX2; `x` and `q` hold one block each.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8], scale: &mut f32) -> (i32, i32) {
    debug_assert!(x.len() == BLOCK && q.len() == BLOCK);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut v = [_mm256_setzero_ps(); 4];
    for (i, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(x.as_ptr().add(8 * i));
    }
    let mut m = _mm256_setzero_ps();
    for v in v {
        m = _mm256_max_ps(_mm256_and_ps(v, abs), m);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let (d, id) = scales(_mm_cvtss_f32(m));
    let id = _mm256_set1_ps(id);
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let half = _mm256_set1_ps(0.5);
    let mut r = [_mm256_setzero_si256(); 4];
    for (r, v) in r.iter_mut().zip(v) {
        let s = _mm256_mul_ps(v, id);
        let t = _mm256_add_ps(s, _mm256_or_ps(_mm256_and_ps(s, sign), half));
        let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
        let c = _mm256_min_ps(
            _mm256_max_ps(t, _mm256_set1_ps(-127.0)),
            _mm256_set1_ps(127.0),
        );
        *r = _mm256_and_si256(_mm256_cvttps_epi32(c), ordered);
    }
    // i32 → i16 → i8 packs work within 128-bit lanes; the permute puts the groups of four
    // back in order.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(r[0], r[1]),
        _mm256_packs_epi32(r[2], r[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p);
    let first = sum8(_mm256_add_epi32(r[0], r[1]));
    let second = sum8(_mm256_add_epi32(r[2], r[3]));
    *scale = d;
    (first + second, first)
}
