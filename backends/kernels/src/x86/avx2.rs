//! AVX2: each half-panel of 8 features is one register wide; `vpmaddubsw` multiplies quant
//! pairs into i16, `vpmaddwd` sums them into i32. 4-bit quants (0..15) let eight groups add up
//! in i16 before widening, 5- and 6-bit ones (0..31, 0..63) two; Q8_0 uses the sign trick (|w| × sign(a, w)) so
//! no pair saturates.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{for_row_tiles, format_of, Rows, Q8_0};
use crate::packed::{
    high_bits, kind, mins_at, offset, scales_at, stride, sub_bytes, sub_mins_at, sub_scales_at,
    subs, Kind, Panel,
};
use crate::{QuantizedRows, PANEL};

/// # Safety
/// The CPU must have AVX2, F16C and FMA; `panel` holds `units` blocks of its format.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn panel(
    panel: Panel,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    let (format, data, units) = (panel.format, panel.data.as_ptr(), panel.units);
    if rows.len() == 1 {
        // One decode row: bound by reading the weights, not by decoding them.
        for_row_tiles!(tile_both, 1, format, x, rows, out, data, units);
        return;
    }
    for half in 0..2 {
        for_row_tiles!(
            tile_half,
            4,
            format,
            x,
            rows.clone(),
            &mut *out,
            data,
            units,
            half
        );
    }
}

/// The 8 groups of one sub-block's quants for one half-panel (`u8`, 8 features × 4 each).
#[target_feature(enable = "avx2")]
unsafe fn weights<const F: u8>(sub: *const u8, half: usize) -> [__m256i; 8] {
    let low = _mm256_set1_epi8(0x0f);
    let load = |g: usize| _mm256_loadu_si256(sub.add((g * PANEL + 8 * half) * 4) as *const __m256i);
    let mut w = [_mm256_setzero_si256(); 8];
    if F == Q8_0 {
        for (g, w) in w.iter_mut().enumerate() {
            *w = load(g);
        }
        return w;
    }
    for h in 0..4 {
        let v = load(h);
        w[h] = _mm256_and_si256(v, low);
        w[h + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
    }
    let bits = high_bits(format_of(F));
    if bits == 1 {
        // Bit g of the plane becomes group g's bit 4.
        let hb = load(4);
        let one = _mm256_set1_epi8(0x10);
        let shifted = [
            _mm256_slli_epi16::<4>(hb),
            _mm256_slli_epi16::<3>(hb),
            _mm256_slli_epi16::<2>(hb),
            _mm256_slli_epi16::<1>(hb),
            hb,
            _mm256_srli_epi16::<1>(hb),
            _mm256_srli_epi16::<2>(hb),
            _mm256_srli_epi16::<3>(hb),
        ];
        for (w, s) in w.iter_mut().zip(shifted) {
            *w = _mm256_or_si256(*w, _mm256_and_si256(s, one));
        }
    } else if bits == 2 {
        // Bits 2h..2h+2 of the high planes become bits 4..6.
        let two = _mm256_set1_epi8(0x30);
        for (plane, w) in w.chunks_exact_mut(4).enumerate() {
            let hb = load(4 + plane);
            let shifted = [
                _mm256_slli_epi16::<4>(hb),
                _mm256_slli_epi16::<2>(hb),
                hb,
                _mm256_srli_epi16::<2>(hb),
            ];
            for (w, s) in w.iter_mut().zip(shifted) {
                *w = _mm256_or_si256(*w, _mm256_and_si256(s, two));
            }
        }
    }
    w
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const F: u8, const BOTH: bool>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
    first_half: usize,
) {
    let format = format_of(F);
    let (st, sb, n_sub, off) = (
        stride(format),
        sub_bytes(format),
        subs(format),
        offset(format),
    );
    let (kd, bits) = (kind(format), high_bits(format));
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let bcast = |a: *const i8, at: usize| {
        _mm256_set1_epi32(std::ptr::read_unaligned(a.add(at) as *const i32))
    };
    let n_halves = if BOTH { 2 } else { 1 };
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for u in 0..units {
        let unit = panel.add(u * st);
        // Two units ahead, as the AVX-512 tiles do (see there).
        let ahead = unit.wrapping_add(2 * st);
        for line in (0..st).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
        }
        // `hx` picks the half and its accumulators alike.
        #[allow(clippy::needless_range_loop)]
        for hx in 0..n_halves {
            let half = if BOTH { hx } else { first_half };
            let halves = |at: *const u8| {
                _mm256_cvtph_ps(_mm_loadu_si128(at.add(2 * 8 * half) as *const __m128i))
            };
            let bytes8 = |at: *const u8| _mm_loadl_epi64(at.add(8 * half) as *const __m128i);
            let d = halves(unit.add(scales_at(format)));
            let mins = if kd == Kind::Min || kd == Kind::SubScaled {
                halves(unit.add(mins_at(format)))
            } else {
                _mm256_setzero_ps()
            };
            for j in 0..n_sub {
                let b = u * n_sub + j;
                let w = weights::<F>(unit.add(j * sb), half);
                // An index loop: `array::from_fn`'s closure (or an iterator adapter) is not inlined
                // into this AVX2 function.
                let mut a = [std::ptr::null::<i8>(); R];
                #[allow(clippy::needless_range_loop)]
                for r in 0..R {
                    a[r] = rows.qs[r].add(b * 32);
                }
                // Per row: Σ q·a over the block (Q6_K: over each half).
                let mut dot = [[_mm256_setzero_si256(); 2]; R];
                if F == Q8_0 {
                    for (g, w) in w.iter().enumerate() {
                        let ws = _mm256_xor_si256(*w, flip);
                        let wa = _mm256_abs_epi8(ws);
                        for r in 0..R {
                            let p =
                                _mm256_maddubs_epi16(wa, _mm256_sign_epi8(bcast(a[r], 4 * g), ws));
                            dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(p, ones));
                        }
                    }
                } else if kd == Kind::Halves {
                    for r in 0..R {
                        for (h, dot) in dot[r].iter_mut().enumerate() {
                            for pair in 0..2 {
                                let g = 4 * h + 2 * pair;
                                let p = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(w[g], bcast(a[r], 4 * g)),
                                    _mm256_maddubs_epi16(w[g + 1], bcast(a[r], 4 * g + 4)),
                                );
                                *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                } else {
                    for h in 0..4 {
                        for r in 0..R {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w[h], bcast(a[r], 4 * h)),
                                _mm256_maddubs_epi16(w[h + 4], bcast(a[r], 16 + 4 * h)),
                            );
                            dot[r][0] = if bits == 0 {
                                _mm256_add_epi16(dot[r][0], p)
                            } else {
                                _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(p, ones))
                            };
                        }
                    }
                    if bits == 0 {
                        for d in dot.iter_mut() {
                            d[0] = _mm256_madd_epi16(d[0], ones);
                        }
                    }
                }
                let (dj, mj) = if kd == Kind::SubScaled {
                    let sc = _mm256_cvtepu8_epi32(bytes8(unit.add(sub_scales_at(format, j))));
                    let m = _mm256_cvtepu8_epi32(bytes8(unit.add(sub_mins_at(format, j))));
                    (
                        _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)),
                        _mm256_mul_ps(mins, _mm256_cvtepi32_ps(m)),
                    )
                } else {
                    (d, mins)
                };
                let sc6 = |h: usize| {
                    _mm256_cvtepi8_epi32(bytes8(unit.add(sub_scales_at(format, 2 * j + h))))
                };
                for r in 0..R {
                    let (da, isum) = (*rows.scales[r].add(b), *rows.sums[r].add(b));
                    let dd = _mm256_mul_ps(dj, _mm256_set1_ps(da));
                    if kd == Kind::Halves {
                        let s0 = *rows.half_sums[r].add(b);
                        let lo = _mm256_sub_epi32(dot[r][0], _mm256_set1_epi32(off * s0));
                        let hi = _mm256_sub_epi32(dot[r][1], _mm256_set1_epi32(off * (isum - s0)));
                        let t = _mm256_add_epi32(
                            _mm256_mullo_epi32(sc6(0), lo),
                            _mm256_mullo_epi32(sc6(1), hi),
                        );
                        acc[r][hx] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), dd, acc[r][hx]);
                        continue;
                    }
                    // Q8_0's sign trick already gave Σ w·a; Q4_0/Q5_0 still hold Σ q·a.
                    let mut dot = dot[r][0];
                    if F != Q8_0 && off != 0 {
                        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(off * isum));
                    }
                    acc[r][hx] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dd, acc[r][hx]);
                    let s = _mm256_set1_ps(da * isum as f32);
                    if kd == Kind::Min {
                        acc[r][hx] = _mm256_fmadd_ps(mj, s, acc[r][hx]);
                    } else if kd == Kind::SubScaled {
                        acc[r][hx] = _mm256_fnmadd_ps(mj, s, acc[r][hx]);
                    }
                }
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        for (hi, acc) in acc.iter().enumerate().take(n_halves) {
            let half = if BOTH { hi } else { first_half };
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * half), *acc);
        }
    }
}

/// Both half-panels in one pass over the panel, for a few rows (decode): each cache line of
/// quants is used whole while it is in L1, and the two halves' work overlaps.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_both<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
) {
    tile::<R, F, true>(rows, out, panel, units, 0)
}

/// One half-panel (`half` 0 or 1) for a tile of rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_half<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
    half: usize,
) {
    tile::<R, F, false>(rows, out, panel, units, half)
}
