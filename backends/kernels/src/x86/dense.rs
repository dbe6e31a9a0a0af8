//! bf16 panels: each input's 16 weights widened to f32 (a zero-extend and a shift: bf16 is the
//! top half of an f32) and multiplied into one accumulator per (row, feature).

use std::arch::x86_64::*;
use std::ops::Range;

use crate::PANEL;

/// Inputs ahead of the one being multiplied whose weights are prefetched (4 KiB).
const PREFETCH: usize = 128;

/// Calls `$tile::<R>(…)` for `rows` in tiles of `$max` rows and one tail tile.
macro_rules! for_dense_tiles {
    ($tile:ident, $max:literal, $rows:expr, $out:expr, $($arg:expr),*) => {{
        let rows: Range<usize> = $rows;
        let out: &mut [[f32; PANEL]] = $out;
        let mut r = rows.start;
        while r < rows.end {
            let o = &mut out[r - rows.start..];
            let step = (rows.end - r).min($max);
            match step {
                1 => $tile::<1>(r, o, $($arg),*),
                2 => $tile::<2>(r, o, $($arg),*),
                3 => $tile::<3>(r, o, $($arg),*),
                4 => $tile::<4>(r, o, $($arg),*),
                5 => $tile::<5>(r, o, $($arg),*),
                6 => $tile::<6>(r, o, $($arg),*),
                7 => $tile::<7>(r, o, $($arg),*),
                _ => $tile::<$max>(r, o, $($arg),*),
            }
            r += step;
        }
    }};
}

/// # Safety
/// The CPU must have AVX-512 F and FMA; `panel` holds `16·k` values, `x` whole rows of `k`.
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn panel_avx512(
    panel: &[u16],
    x: &[f32],
    k: usize,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    for_dense_tiles!(tile512, 8, rows, out, panel.as_ptr(), x.as_ptr(), k);
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn tile512<const R: usize>(
    first: usize,
    out: &mut [[f32; PANEL]],
    panel: *const u16,
    x: *const f32,
    k: usize,
) {
    let xs: [*const f32; R] = std::array::from_fn(|r| x.add((first + r) * k));
    let mut acc = [_mm512_setzero_ps(); R];
    for i in 0..k {
        if i % 2 == 0 {
            // 4 KiB ahead: a lone row (decode) streams the panel from memory.
            _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((i + PREFETCH) * PANEL) as *const i8);
        }
        let raw = _mm256_loadu_si256(panel.add(i * PANEL) as *const __m256i);
        let w = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)));
        // Index loops: an iterator adapter here is not inlined into this AVX-512 function.
        for r in 0..R {
            acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(*xs[r].add(i)), acc[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA; `panel` holds `16·k` values, `x` whole rows of `k`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn panel_avx2(
    panel: &[u16],
    x: &[f32],
    k: usize,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    for_dense_tiles!(tile256, 4, rows, out, panel.as_ptr(), x.as_ptr(), k);
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile256<const R: usize>(
    first: usize,
    out: &mut [[f32; PANEL]],
    panel: *const u16,
    x: *const f32,
    k: usize,
) {
    let xs: [*const f32; R] = std::array::from_fn(|r| x.add((first + r) * k));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for i in 0..k {
        if i % 2 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(panel.wrapping_add((i + PREFETCH) * PANEL) as *const i8);
        }
        let widen = |at: usize| {
            let raw = _mm_loadu_si128(panel.add(i * PANEL + at) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        };
        let (lo, hi) = (widen(0), widen(8));
        for r in 0..R {
            let a = _mm256_set1_ps(*xs[r].add(i));
            acc[r][0] = _mm256_fmadd_ps(lo, a, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(hi, a, acc[r][1]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r][0]);
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[r][1]);
    }
}
