//! AVX-512 VNNI: one `vpdpbusd` multiplies four quants of all 16 features of a panel by four
//! broadcast activation quants; a tile keeps 8 activation rows in registers against one
//! decoded weight sub-block.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{for_row_tiles, format_of, Rows, Q8_0};
use crate::packed::{
    high_bits, kind, mins_at, offset, scales_at, stride, sub_bytes, sub_mins_at, sub_scales_at,
    subs, Kind, Panel,
};
use crate::{QuantizedRows, PANEL};

/// # Safety
/// The CPU must have AVX-512 F/BW/VNNI, F16C and FMA; `panel` holds `units` blocks of its
/// format.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub(crate) unsafe fn panel(
    panel: Panel,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    let (format, data, units) = (panel.format, panel.data.as_ptr(), panel.units);
    if kind(format) == Kind::Halves {
        // Q6_K's larger row body is not unrolled over 8 rows: the accumulators would live on
        // the stack. 4 rows keep them in registers.
        for_row_tiles!(tile, 4, format, x, rows, out, data, units, x);
    } else {
        for_row_tiles!(tile, 8, format, x, rows, out, data, units, x);
    }
}

/// 16 f16 at `at` as f32.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn halves(at: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i))
}

/// The 8 groups of one sub-block's quants (`u8`, 16 features × 4 each).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn weights<const F: u8>(sub: *const u8) -> [__m512i; 8] {
    let low = _mm512_set1_epi8(0x0f);
    let load = |at: usize| _mm512_loadu_si512(sub.add(at) as *const _);
    let mut w = [_mm512_setzero_si512(); 8];
    if F == Q8_0 {
        for (g, w) in w.iter_mut().enumerate() {
            *w = load(64 * g);
        }
        return w;
    }
    for h in 0..4 {
        let v = load(64 * h);
        w[h] = _mm512_and_si512(v, low);
        w[h + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
    }
    let bits = high_bits(format_of(F));
    if bits == 1 {
        // Bit g of the plane becomes group g's bit 4.
        let hb = load(256);
        let one = _mm512_set1_epi8(0x10);
        let shifted = [
            _mm512_slli_epi16::<4>(hb),
            _mm512_slli_epi16::<3>(hb),
            _mm512_slli_epi16::<2>(hb),
            _mm512_slli_epi16::<1>(hb),
            hb,
            _mm512_srli_epi16::<1>(hb),
            _mm512_srli_epi16::<2>(hb),
            _mm512_srli_epi16::<3>(hb),
        ];
        for (w, s) in w.iter_mut().zip(shifted) {
            *w = _mm512_or_si512(*w, _mm512_and_si512(s, one));
        }
    } else if bits == 2 {
        // Bits 2h..2h+2 of the high planes become bits 4..6.
        let two = _mm512_set1_epi8(0x30);
        for (plane, w) in w.chunks_exact_mut(4).enumerate() {
            let hb = load(256 + 64 * plane);
            let shifted = [
                _mm512_slli_epi16::<4>(hb),
                _mm512_slli_epi16::<2>(hb),
                hb,
                _mm512_srli_epi16::<2>(hb),
            ];
            for (w, s) in w.iter_mut().zip(shifted) {
                *w = _mm512_or_si512(*w, _mm512_and_si512(s, two));
            }
        }
    }
    w
}

/// A sub-block's weight scales for the 16 features: `d` (Q4_K/Q5_K: `d·sc`), the minimums
/// (`m`, Q4_K/Q5_K: `dmin·m`), and Q6_K's two integer scales of its halves.
#[derive(Clone, Copy)]
struct SubScales {
    d: __m512,
    m: __m512,
    sc: [__m512i; 2],
}

/// Sub-block `j`'s scales from its unit's `d` and `mins` (16 features each).
#[inline(always)]
unsafe fn sub_scales<const F: u8>(unit: *const u8, j: usize, d: __m512, mins: __m512) -> SubScales {
    let format = format_of(F);
    let kd = kind(format);
    let bytes16 = |at: *const u8| _mm_loadu_si128(at as *const __m128i);
    let (d, m) = if kd == Kind::SubScaled {
        let sc = _mm512_cvtepu8_epi32(bytes16(unit.add(sub_scales_at(format, j))));
        let m = _mm512_cvtepu8_epi32(bytes16(unit.add(sub_mins_at(format, j))));
        (
            _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc)),
            _mm512_mul_ps(mins, _mm512_cvtepi32_ps(m)),
        )
    } else {
        (d, mins)
    };
    let sc6 = |h: usize| _mm512_cvtepi8_epi32(bytes16(unit.add(sub_scales_at(format, 2 * j + h))));
    let sc = if kd == Kind::Halves {
        [sc6(0), sc6(1)]
    } else {
        [_mm512_setzero_si512(); 2]
    };
    SubScales { d, m, sc }
}

/// A unit's `d` and minimums (zero where the format has none), 16 features each.
#[inline(always)]
unsafe fn unit_scales<const F: u8>(unit: *const u8) -> (__m512, __m512) {
    let format = format_of(F);
    let d = halves(unit.add(scales_at(format)));
    let mins = match kind(format) {
        Kind::Min | Kind::SubScaled => halves(unit.add(mins_at(format))),
        _ => _mm512_setzero_ps(),
    };
    (d, mins)
}

/// `acc +` one activation block (quants at `a`, scale `da`, sums `isum` and `half`) times the
/// sub-block's weights `w`, as [`Kind`] says. `CHAINS` independent chains of `vpdpbusd` sum
/// the block (the integer sum is the same for any number): a tile's rows already overlap
/// their chains, a lone refined block needs its own.
#[inline(always)]
unsafe fn block<const F: u8, const CHAINS: usize>(
    acc: __m512,
    w: &[__m512i; 8],
    s: SubScales,
    a: *const i8,
    (da, isum, half): (f32, i32, i32),
) -> __m512 {
    let format = format_of(F);
    let (kd, off) = (kind(format), offset(format));
    let bcast = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(a.add(4 * g) as *const i32));
    let dd = _mm512_mul_ps(s.d, _mm512_set1_ps(da));
    if kd == Kind::Halves {
        let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        for g in 0..4 {
            lo = _mm512_dpbusd_epi32(lo, w[g], bcast(g));
            hi = _mm512_dpbusd_epi32(hi, w[g + 4], bcast(g + 4));
        }
        lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(off * half));
        hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(off * (isum - half)));
        let t = _mm512_add_epi32(
            _mm512_mullo_epi32(s.sc[0], lo),
            _mm512_mullo_epi32(s.sc[1], hi),
        );
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), dd, acc);
    }
    let mut chains = [_mm512_setzero_si512(); CHAINS];
    for (g, w) in w.iter().enumerate() {
        chains[g % CHAINS] = _mm512_dpbusd_epi32(chains[g % CHAINS], *w, bcast(g));
    }
    let mut dot = chains[0];
    for c in &chains[1..] {
        dot = _mm512_add_epi32(dot, *c);
    }
    if off != 0 {
        dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(off * isum));
    }
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dd, acc);
    let sum = _mm512_set1_ps(da * isum as f32);
    match kd {
        Kind::Min => _mm512_fmadd_ps(s.m, sum, acc),
        Kind::SubScaled => _mm512_fnmadd_ps(s.m, sum, acc),
        _ => acc,
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
unsafe fn tile<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    units: usize,
    x: &QuantizedRows,
) {
    let format = format_of(F);
    let (st, sb, n_sub) = (stride(format), sub_bytes(format), subs(format));
    let mut acc = [_mm512_setzero_ps(); R];
    // How far ahead the panel is prefetched: two units keep a lone row (decode) streaming
    // from memory; a full tile spends eight times longer on each unit, and at two units the
    // weights of the first tile over a panel arrived late (16–32 rows ran 5–15% slower on a
    // matrix larger than the cache): eight sub-blocks, at least two units, ahead for it. The
    // panel's last units prefetch the next panel's first ones (a prefetch past the matrix
    // is harmless: it never faults, hence `wrapping_add`).
    let ahead_units = if R >= 8 { (8 / n_sub).max(2) } else { 2 };
    for u in 0..units {
        let unit = panel.add(u * st);
        let ahead = unit.wrapping_add(ahead_units * st);
        for line in (0..st).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
        }
        let (d, mins) = unit_scales::<F>(unit);
        for j in 0..n_sub {
            let b = u * n_sub + j;
            let w = weights::<F>(unit.add(j * sb));
            let s = sub_scales::<F>(unit, j, d, mins);
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = rows.qs[r].add(b * 32);
                *acc = block::<F, 1>(*acc, &w, s, a, rows.sums(r, b));
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
    if rows.refined {
        for (r, out) in out.iter_mut().enumerate().take(R) {
            refine_row::<F>(panel, x, rows.first + r, out);
        }
    }
}

/// Row `r`'s refined blocks (their second pass) added to `out`, the row's result of the first
/// pass, in block order (the scalar twin's order). Row by row: the rows of a tile seldom
/// refine the same blocks.
#[inline(always)]
unsafe fn refine_row<const F: u8>(
    panel: *const u8,
    x: &QuantizedRows,
    r: usize,
    out: &mut [f32; PANEL],
) {
    let refined = x.refined_in(r);
    if refined.is_empty() {
        return;
    }
    let format = format_of(F);
    let (st, sb, n_sub) = (stride(format), sub_bytes(format), subs(format));
    let residual = x.residual_row(r);
    let mut acc = _mm512_loadu_ps(out.as_ptr());
    for &b in refined {
        let b = b as usize;
        let (u, j) = (b / n_sub, b % n_sub);
        let unit = panel.add(u * st);
        let (d, mins) = unit_scales::<F>(unit);
        let w = weights::<F>(unit.add(j * sb));
        let s = sub_scales::<F>(unit, j, d, mins);
        let a = residual.qs.as_ptr().add(b * 32);
        let sums = (residual.scales[b], residual.sums[b], residual.half_sums[b]);
        acc = block::<F, 4>(acc, &w, s, a, sums);
    }
    _mm512_storeu_ps(out.as_mut_ptr(), acc);
}
