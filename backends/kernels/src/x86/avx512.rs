//! AVX-512 VNNI: one `vpdpbusd` multiplies four quants of all 16 features of a panel by four
//! broadcast activation quants; a tile keeps 8 activation rows in registers against one
//! decoded weight block.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{for_row_tiles, format_of, Rows, Q4_1, Q8_0};
use crate::packed::{quant_bytes, stride, Panel};
use crate::{QuantizedRows, PANEL};

/// # Safety
/// The CPU must have AVX-512 F/BW/VNNI, F16C and FMA; `panel` holds `nb` blocks of `format`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub(crate) unsafe fn panel(
    panel: Panel,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    let (format, data, nb) = (panel.format, panel.data.as_ptr(), panel.blocks);
    for_row_tiles!(tile, 8, format, x, rows, out, data, nb);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
unsafe fn tile<const R: usize, const F: u8>(
    rows: &Rows<R>,
    out: &mut [[f32; PANEL]],
    panel: *const u8,
    nb: usize,
) {
    let format = format_of(F);
    let (st, qb) = (stride(format), quant_bytes(format));
    let low = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let blk = panel.add(b * st);
        let mut w = [_mm512_setzero_si512(); 8];
        if F == Q8_0 {
            for (g, w) in w.iter_mut().enumerate() {
                *w = _mm512_loadu_si512(blk.add(64 * g) as *const _);
            }
        } else {
            for h in 0..4 {
                let v = _mm512_loadu_si512(blk.add(64 * h) as *const _);
                w[h] = _mm512_and_si512(v, low);
                w[h + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb) as *const __m256i));
        let m = if F == Q4_1 {
            _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(qb + 2 * PANEL) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = rows.qs[r].add(b * 32);
            let mut dot = _mm512_setzero_si512();
            for (g, w) in w.iter().enumerate() {
                let ab = _mm512_set1_epi32(std::ptr::read_unaligned(a.add(4 * g) as *const i32));
                dot = _mm512_dpbusd_epi32(dot, *w, ab);
            }
            let (da, isum) = (*rows.scales[r].add(b), *rows.sums[r].add(b));
            let off = crate::packed::offset(format);
            if off != 0 {
                dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(off * isum));
            }
            let dd = _mm512_mul_ps(d, _mm512_set1_ps(da));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dd, *acc);
            if F == Q4_1 {
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(da * isum as f32), *acc);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        _mm512_storeu_ps(o.as_mut_ptr(), acc);
    }
}
