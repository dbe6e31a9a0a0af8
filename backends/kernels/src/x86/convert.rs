//! [`crate::convert`] with AVX-512 (16 values at a time) and AVX2 with F16C (8); the tails
//! go through the scalar twins, whose conversions are the same roundings.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::attention::{Q8Block, Q8_VALUES};
use crate::convert::{bf16_to_f32_scalar, f16_to_f32_scalar, f32_to_f16_scalar};

/// # Safety
/// The CPU must have AVX-512F and F16C; the slices have the same length.
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) {
    let n = dst.len() / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for at in (0..n).step_by(16) {
        let h = _mm256_loadu_si256(s.add(at) as *const __m256i);
        _mm512_storeu_ps(d.add(at), _mm512_cvtph_ps(h));
    }
    f16_to_f32_scalar(&src[n..], &mut dst[n..]);
}

/// # Safety
/// As [`f16_to_f32_avx512`].
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn f32_to_f16_avx512(src: &[f32], dst: &mut [f16]) {
    let n = dst.len() / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for at in (0..n).step_by(16) {
        let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_loadu_ps(s.add(at)));
        _mm256_storeu_si256(d.add(at) as *mut __m256i, h);
    }
    f32_to_f16_scalar(&src[n..], &mut dst[n..]);
}

/// # Safety
/// The CPU must have AVX-512F; the slices have the same length.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bf16_to_f32_avx512(src: &[bf16], dst: &mut [f32]) {
    let n = dst.len() / 16 * 16;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for at in (0..n).step_by(16) {
        let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(s.add(at) as *const __m256i));
        _mm512_storeu_si512(d.add(at) as *mut _, _mm512_slli_epi32::<16>(h));
    }
    bf16_to_f32_scalar(&src[n..], &mut dst[n..]);
}

/// # Safety
/// The CPU must have AVX2 and F16C; the slices have the same length.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f16_to_f32_avx2(src: &[f16], dst: &mut [f32]) {
    let n = dst.len() / 8 * 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for at in (0..n).step_by(8) {
        let h = _mm_loadu_si128(s.add(at) as *const __m128i);
        _mm256_storeu_ps(d.add(at), _mm256_cvtph_ps(h));
    }
    f16_to_f32_scalar(&src[n..], &mut dst[n..]);
}

/// # Safety
/// As [`f16_to_f32_avx2`].
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f32_to_f16_avx2(src: &[f32], dst: &mut [f16]) {
    let n = dst.len() / 8 * 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for at in (0..n).step_by(8) {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.add(at)));
        _mm_storeu_si128(d.add(at) as *mut __m128i, h);
    }
    f32_to_f16_scalar(&src[n..], &mut dst[n..]);
}

/// # Safety
/// The CPU must have AVX2; the slices have the same length.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn bf16_to_f32_avx2(src: &[bf16], dst: &mut [f32]) {
    let n = dst.len() / 8 * 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for at in (0..n).step_by(8) {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(s.add(at) as *const __m128i));
        _mm256_storeu_si256(d.add(at) as *mut __m256i, _mm256_slli_epi32::<16>(h));
    }
    bf16_to_f32_scalar(&src[n..], &mut dst[n..]);
}

/// # Safety
/// The CPU must have AVX-512F and F16C; `dst` holds `32 · src.len()` floats.
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn q8_to_f32_avx512(src: &[Q8Block], dst: &mut [f32]) {
    let d = dst.as_mut_ptr();
    for (b, block) in src.iter().enumerate() {
        let scale = _mm512_cvtph_ps(_mm256_set1_epi16(block.d.to_bits() as i16));
        let qs = block.qs.as_ptr() as *const __m128i;
        for h in 0..2 {
            let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs.add(h))));
            _mm512_storeu_ps(d.add(b * Q8_VALUES + 16 * h), _mm512_mul_ps(q, scale));
        }
    }
}

/// # Safety
/// The CPU must have AVX2 and F16C; `dst` holds `32 · src.len()` floats.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn q8_to_f32_avx2(src: &[Q8Block], dst: &mut [f32]) {
    let d = dst.as_mut_ptr();
    for (b, block) in src.iter().enumerate() {
        let scale = _mm256_cvtph_ps(_mm_set1_epi16(block.d.to_bits() as i16));
        let qs = block.qs.as_ptr();
        for e in 0..4 {
            let bytes = _mm_loadl_epi64(qs.add(8 * e) as *const __m128i);
            let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
            _mm256_storeu_ps(d.add(b * Q8_VALUES + 8 * e), _mm256_mul_ps(q, scale));
        }
    }
}
