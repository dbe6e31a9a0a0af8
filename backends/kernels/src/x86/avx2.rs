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
        for_row_tiles!(tile_both, 1, format, x, rows, out, data, units, x);
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
            half,
            x
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

/// Per row of a tile: `Σ q·a` over an activation block (Q8_0: `Σ w·a`; Q6_K: over each half)
/// for `R` rows at once (quants at `a[r]`), the tile's row loop innermost so that each weight
/// register serves every row.
#[inline(always)]
unsafe fn dots<const R: usize, const F: u8>(
    w: &[__m256i; 8],
    a: [*const i8; R],
) -> [[__m256i; 2]; R] {
    let (kd, bits) = (kind(format_of(F)), high_bits(format_of(F)));
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let bcast = |a: *const i8, at: usize| {
        _mm256_set1_epi32(std::ptr::read_unaligned(a.add(at) as *const i32))
    };
    let mut dot = [[_mm256_setzero_si256(); 2]; R];
    if F == Q8_0 {
        for (g, w) in w.iter().enumerate() {
            let ws = _mm256_xor_si256(*w, flip);
            let wa = _mm256_abs_epi8(ws);
            for r in 0..R {
                let p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(bcast(a[r], 4 * g), ws));
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
    dot
}

/// A sub-block's weight scales for one half-panel: `d` (Q4_K/Q5_K: `d·sc`), the minimums
/// (`m`, Q4_K/Q5_K: `dmin·m`), and Q6_K's two integer scales of its halves.
#[derive(Clone, Copy)]
struct SubScales {
    d: __m256,
    m: __m256,
    sc: [__m256i; 2],
}

/// A unit's `d` and minimums (zero where the format has none) for half-panel `half`.
#[inline(always)]
unsafe fn unit_scales<const F: u8>(unit: *const u8, half: usize) -> (__m256, __m256) {
    let format = format_of(F);
    let halves =
        |at: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(at.add(2 * 8 * half) as *const __m128i));
    let d = halves(unit.add(scales_at(format)));
    let mins = match kind(format) {
        Kind::Min | Kind::SubScaled => halves(unit.add(mins_at(format))),
        _ => _mm256_setzero_ps(),
    };
    (d, mins)
}

/// Sub-block `j`'s scales for half-panel `half`, from its unit's `d` and `mins`.
#[inline(always)]
unsafe fn sub_scales<const F: u8>(
    unit: *const u8,
    j: usize,
    half: usize,
    d: __m256,
    mins: __m256,
) -> SubScales {
    let format = format_of(F);
    let kd = kind(format);
    let bytes8 = |at: *const u8| _mm_loadl_epi64(at.add(8 * half) as *const __m128i);
    let (d, m) = if kd == Kind::SubScaled {
        let sc = _mm256_cvtepu8_epi32(bytes8(unit.add(sub_scales_at(format, j))));
        let m = _mm256_cvtepu8_epi32(bytes8(unit.add(sub_mins_at(format, j))));
        (
            _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)),
            _mm256_mul_ps(mins, _mm256_cvtepi32_ps(m)),
        )
    } else {
        (d, mins)
    };
    let sc6 = |h: usize| _mm256_cvtepi8_epi32(bytes8(unit.add(sub_scales_at(format, 2 * j + h))));
    let sc = if kd == Kind::Halves {
        [sc6(0), sc6(1)]
    } else {
        [_mm256_setzero_si256(); 2]
    };
    SubScales { d, m, sc }
}

/// `acc +` one activation block's integer dots (scale `da`, sums `isum` and `half`) scaled by
/// the sub-block's weight scales, as [`Kind`] says.
#[inline(always)]
unsafe fn scale_dot<const F: u8>(
    acc: __m256,
    dot: [__m256i; 2],
    s: SubScales,
    (da, isum, half): (f32, i32, i32),
) -> __m256 {
    let format = format_of(F);
    let (kd, off) = (kind(format), offset(format));
    let dd = _mm256_mul_ps(s.d, _mm256_set1_ps(da));
    if kd == Kind::Halves {
        let lo = _mm256_sub_epi32(dot[0], _mm256_set1_epi32(off * half));
        let hi = _mm256_sub_epi32(dot[1], _mm256_set1_epi32(off * (isum - half)));
        let t = _mm256_add_epi32(
            _mm256_mullo_epi32(s.sc[0], lo),
            _mm256_mullo_epi32(s.sc[1], hi),
        );
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), dd, acc);
    }
    // Q8_0's sign trick already gave Σ w·a; Q4_0/Q5_0 still hold Σ q·a.
    let mut dot = dot[0];
    if F != Q8_0 && off != 0 {
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(off * isum));
    }
    let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dd, acc);
    let sum = _mm256_set1_ps(da * isum as f32);
    match kd {
        Kind::Min => _mm256_fmadd_ps(s.m, sum, acc),
        Kind::SubScaled => _mm256_fnmadd_ps(s.m, sum, acc),
        _ => acc,
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const F: u8, const BOTH: bool>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
    first_half: usize,
    x: &QuantizedRows,
) {
    let format = format_of(F);
    let (st, sb, n_sub) = (stride(format), sub_bytes(format), subs(format));
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
            let (d, mins) = unit_scales::<F>(unit, half);
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
                let dot = dots::<R, F>(&w, a);
                let s = sub_scales::<F>(unit, j, half, d, mins);
                for r in 0..R {
                    acc[r][hx] = scale_dot::<F>(acc[r][hx], dot[r], s, rows.sums(r, b));
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
    if rows.refined {
        for (r, out) in out.iter_mut().enumerate().take(R) {
            for hx in 0..n_halves {
                let half = if BOTH { hx } else { first_half };
                refine_row::<F>(panel, x, rows.first + r, half, out);
            }
        }
    }
}

/// Half-panel `half` of row `r`'s refined blocks (their second pass) added to `out`, the row's
/// result of the first pass, in block order (the scalar twin's order). Row by row: the rows of
/// a tile seldom refine the same blocks.
#[inline(always)]
unsafe fn refine_row<const F: u8>(
    panel: *const u8,
    x: &QuantizedRows,
    r: usize,
    half: usize,
    out: &mut [f32; PANEL],
) {
    let refined = x.refined_in(r);
    if refined.is_empty() {
        return;
    }
    let format = format_of(F);
    let (st, sb, n_sub) = (stride(format), sub_bytes(format), subs(format));
    let residual = x.residual_row(r);
    let mut acc = _mm256_loadu_ps(out.as_ptr().add(8 * half));
    for &b in refined {
        let b = b as usize;
        let (u, j) = (b / n_sub, b % n_sub);
        let unit = panel.add(u * st);
        let (d, mins) = unit_scales::<F>(unit, half);
        let w = weights::<F>(unit.add(j * sb), half);
        let s = sub_scales::<F>(unit, j, half, d, mins);
        let dot = dots::<1, F>(&w, [residual.qs.as_ptr().add(b * 32)]);
        let sums = (residual.scales[b], residual.sums[b], residual.half_sums[b]);
        acc = scale_dot::<F>(acc, dot[0], s, sums);
    }
    _mm256_storeu_ps(out.as_mut_ptr().add(8 * half), acc);
}

/// Both half-panels in one pass over the panel, for a few rows (decode): each cache line of
/// quants is used whole while it is in L1, and the two halves' work overlaps.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_both<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
    x: &QuantizedRows,
) {
    tile::<R, F, true>(rows, out, panel, units, 0, x)
}

/// One half-panel (`half` 0 or 1) for a tile of rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_half<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
    half: usize,
    x: &QuantizedRows,
) {
    tile::<R, F, false>(rows, out, panel, units, half, x)
}
