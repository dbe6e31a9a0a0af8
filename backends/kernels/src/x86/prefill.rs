//! [`crate::prefill`]'s group update with AVX-512 (a tile's 16 lanes in one vector) and AVX2
//! (two halves of 8): the scalar twin's operations in its order, so the same bits.

use std::arch::x86_64::*;

use super::attention::{exp16, exp8};
use crate::prefill::{Group, Lanes, KEYS, TILE};

/// Output elements of the weighted sum updated together: independent chains of multiply-adds
/// (each element's own chain runs over the positions in order).
const CHAINS: usize = 8;

/// # Safety
/// The CPU must have AVX-512 F and FMA; `lanes.qt` and `lanes.o` hold `head_dim × TILE`
/// floats, `g.k` and `g.v` `KEYS × head_dim`.
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn group_avx512(lanes: &mut Lanes<'_>, g: &Group<'_>) {
    match g.head_dim {
        64 => group_avx512_hd::<64>(lanes, g),
        128 => group_avx512_hd::<128>(lanes, g),
        _ => group_avx512_hd::<0>(lanes, g),
    }
}

/// [`group_avx512`] for heads of `HD` values (0: `g.head_dim`); a constant `HD` makes every
/// row offset an immediate.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn group_avx512_hd<const HD: usize>(lanes: &mut Lanes<'_>, g: &Group<'_>) {
    let hd = if HD == 0 { g.head_dim } else { HD };
    let (k, v, qt) = (g.k.as_ptr(), g.v.as_ptr(), lanes.qt.as_ptr());
    let mut s = [_mm512_setzero_ps(); KEYS];
    for d in 0..hd {
        let q = _mm512_loadu_ps(qt.add(d * TILE));
        for (j, s) in s.iter_mut().enumerate() {
            *s = _mm512_fmadd_ps(_mm512_set1_ps(*k.add(j * hd + d)), q, *s);
        }
    }
    if let Some(mask) = g.mask {
        let lo = _mm512_loadu_si512(mask.lo.as_ptr() as *const _);
        let hi = _mm512_loadu_si512(mask.hi.as_ptr() as *const _);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        for (j, s) in s.iter_mut().enumerate() {
            let p = _mm512_set1_epi32(mask.first + j as i32);
            let valid = if j < mask.n {
                _mm512_cmple_epi32_mask(lo, p) & _mm512_cmple_epi32_mask(p, hi)
            } else {
                0
            };
            *s = _mm512_mask_blend_ps(valid, ninf, *s);
        }
    }
    let m_old = _mm512_loadu_ps(lanes.m.as_ptr());
    let mut m = m_old;
    for s in &s {
        m = _mm512_max_ps(m, *s);
    }
    let c = exp16(_mm512_sub_ps(m_old, m));
    let mut l = _mm512_mul_ps(_mm512_loadu_ps(lanes.l.as_ptr()), c);
    for s in s.iter_mut() {
        *s = exp16(_mm512_sub_ps(*s, m));
        l = _mm512_add_ps(l, *s);
    }
    _mm512_storeu_ps(lanes.m.as_mut_ptr(), m);
    _mm512_storeu_ps(lanes.l.as_mut_ptr(), l);

    let o = lanes.o.as_mut_ptr();
    let mut d = 0;
    while d + CHAINS <= hd {
        let mut acc = [c; CHAINS];
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_mul_ps(_mm512_loadu_ps(o.add((d + i) * TILE)), c);
        }
        for (j, p) in s.iter().enumerate() {
            let row = v.add(j * hd + d);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(i)), *p, *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.add((d + i) * TILE), *acc);
        }
        d += CHAINS;
    }
    for d in d..hd {
        let mut acc = _mm512_mul_ps(_mm512_loadu_ps(o.add(d * TILE)), c);
        for (j, p) in s.iter().enumerate() {
            acc = _mm512_fmadd_ps(_mm512_set1_ps(*v.add(j * hd + d)), *p, acc);
        }
        _mm512_storeu_ps(o.add(d * TILE), acc);
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA; shapes as for [`group_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn group_avx2(lanes: &mut Lanes<'_>, g: &Group<'_>) {
    for half in [0, 8] {
        half_avx2(lanes, g, half);
    }
}

/// Lanes `at..at + 8` of [`group_avx2`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn half_avx2(lanes: &mut Lanes<'_>, g: &Group<'_>, at: usize) {
    let hd = g.head_dim;
    let (k, v, qt) = (g.k.as_ptr(), g.v.as_ptr(), lanes.qt.as_ptr());
    // Scores, positions eight at a time (eight accumulators and the query fill the registers).
    let mut s = [_mm256_setzero_ps(); KEYS];
    for first in (0..KEYS).step_by(8) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for d in 0..hd {
            let q = _mm256_loadu_ps(qt.add(d * TILE + at));
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(*k.add((first + i) * hd + d)), q, *acc);
            }
        }
        s[first..first + 8].copy_from_slice(&acc);
    }
    if let Some(mask) = g.mask {
        let lo = _mm256_loadu_si256(mask.lo.as_ptr().add(at) as *const __m256i);
        let hi = _mm256_loadu_si256(mask.hi.as_ptr().add(at) as *const __m256i);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        for (j, s) in s.iter_mut().enumerate() {
            let p = _mm256_set1_epi32(mask.first + j as i32);
            let invalid = if j < mask.n {
                _mm256_or_si256(_mm256_cmpgt_epi32(lo, p), _mm256_cmpgt_epi32(p, hi))
            } else {
                _mm256_set1_epi32(-1)
            };
            *s = _mm256_blendv_ps(*s, ninf, _mm256_castsi256_ps(invalid));
        }
    }
    let m_old = _mm256_loadu_ps(lanes.m.as_ptr().add(at));
    let mut m = m_old;
    for s in &s {
        m = _mm256_max_ps(m, *s);
    }
    let c = exp8(_mm256_sub_ps(m_old, m));
    let mut l = _mm256_mul_ps(_mm256_loadu_ps(lanes.l.as_ptr().add(at)), c);
    for s in s.iter_mut() {
        *s = exp8(_mm256_sub_ps(*s, m));
        l = _mm256_add_ps(l, *s);
    }
    _mm256_storeu_ps(lanes.m.as_mut_ptr().add(at), m);
    _mm256_storeu_ps(lanes.l.as_mut_ptr().add(at), l);

    let o = lanes.o.as_mut_ptr().add(at);
    let mut d = 0;
    while d + CHAINS <= hd {
        let mut acc = [c; CHAINS];
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_mul_ps(_mm256_loadu_ps(o.add((d + i) * TILE)), c);
        }
        for (j, p) in s.iter().enumerate() {
            let row = v.add(j * hd + d);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(*row.add(i)), *p, *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add((d + i) * TILE), *acc);
        }
        d += CHAINS;
    }
    for d in d..hd {
        let mut acc = _mm256_mul_ps(_mm256_loadu_ps(o.add(d * TILE)), c);
        for (j, p) in s.iter().enumerate() {
            acc = _mm256_fmadd_ps(_mm256_set1_ps(*v.add(j * hd + d)), *p, acc);
        }
        _mm256_storeu_ps(o.add(d * TILE), acc);
    }
}
