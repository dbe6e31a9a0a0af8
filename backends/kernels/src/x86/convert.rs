//! [`crate::convert`] with AVX-512 (16 values at a time) and AVX2 with F16C (8); the tails
//! go through the scalar twins, whose conversions are the same roundings.

use std::arch::x86_64::*;

use half::{bf16, f16};

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
