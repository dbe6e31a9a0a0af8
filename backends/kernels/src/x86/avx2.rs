//! AVX2: each half-panel of 8 features is one register wide; `vpmaddubsw` multiplies quant
//! pairs into i16, `vpmaddwd` sums them into i32. Q4 quants (0..15) let eight groups add up in
//! i16 before widening; Q8_0 uses the sign trick (|w| × sign(a, w)) so no pair saturates.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{for_row_tiles, format_of, Rows, Q4_1, Q8_0};
use crate::packed::{quant_bytes, stride, Panel};
use crate::{QuantizedRows, PANEL};

/// # Safety
/// The CPU must have AVX2, F16C and FMA; `panel` holds `nb` blocks of `format`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn panel(
    panel: Panel,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    let (format, data, nb) = (panel.format, panel.data.as_ptr(), panel.blocks);
    for half in 0..2 {
        for_row_tiles!(tile, 4, format, x, rows.clone(), &mut *out, data, nb, half);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    nb: usize,
    half: usize,
) {
    let format = format_of(F);
    let (st, qb) = (stride(format), quant_bytes(format));
    let low = _mm256_set1_epi8(0x0f);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let bcast = |a: *const i8, at: usize| {
        _mm256_set1_epi32(std::ptr::read_unaligned(a.add(at) as *const i32))
    };
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let blk = panel.add(b * st);
        let word =
            |g: usize| _mm256_loadu_si256(blk.add((g * PANEL + 8 * half) * 4) as *const __m256i);
        let a: [*const i8; R] = std::array::from_fn(|r| rows.qs[r].add(b * 32));
        let mut dot = [_mm256_setzero_si256(); R];
        if F == Q8_0 {
            for g in 0..8 {
                let ws = _mm256_xor_si256(word(g), flip);
                let wa = _mm256_abs_epi8(ws);
                for r in 0..R {
                    let p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(bcast(a[r], 4 * g), ws));
                    dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p, ones));
                }
            }
        } else {
            for h in 0..4 {
                let v = word(h);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                for r in 0..R {
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast(a[r], 4 * h)),
                        _mm256_maddubs_epi16(hi, bcast(a[r], 16 + 4 * h)),
                    );
                    dot[r] = _mm256_add_epi16(dot[r], p);
                }
            }
            for d in dot.iter_mut() {
                *d = _mm256_madd_epi16(*d, ones);
            }
        }
        let scales = |at: usize| {
            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(at + 2 * 8 * half) as *const __m128i))
        };
        let d = scales(qb);
        let m = if F == Q4_1 {
            scales(qb + 2 * PANEL)
        } else {
            _mm256_setzero_ps()
        };
        for r in 0..R {
            let (da, isum) = (*rows.scales[r].add(b), *rows.sums[r].add(b));
            // Q8_0's sign trick already gave Σ w·a; Q4_0 still holds Σ q·a.
            let mut dot = dot[r];
            if F != Q8_0 && F != Q4_1 {
                dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * isum));
            }
            let dd = _mm256_mul_ps(d, _mm256_set1_ps(da));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dd, acc[r]);
            if F == Q4_1 {
                acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(da * isum as f32), acc[r]);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr().add(8 * half), acc);
    }
}
