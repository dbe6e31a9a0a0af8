//! [`crate::attention`] with AVX-512 (16 lanes) and AVX2 (8 lanes): the scalar twin's
//! operations in its order, so the same bits. A head's 64 dot-product lanes are 4 zmm or 8 ymm
//! accumulators; a `head_dim` that is not a multiple of the vector is loaded under masks.
//! A 16-bit cache's values are widened to f32 as they are loaded (`vcvtph2ps`, or a shift for
//! bf16): exact, so the arithmetic is the f32 cache's.

use std::arch::x86_64::*;

use crate::attention::{
    KvDtype, KvElement, Q8Block, Rows, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E, Q8_VALUES,
};

/// Values `at..at + 16` of the cache row at `row` under mask `m` (zeros elsewhere), as f32;
/// `at` is a multiple of 16.
#[inline(always)]
unsafe fn load16<T: KvElement>(row: *const T, at: usize, m: __mmask16) -> __m512 {
    match T::DTYPE {
        KvDtype::F32 => _mm512_maskz_loadu_ps(m, (row as *const f32).add(at)),
        KvDtype::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (row as *const i16).add(at))),
        KvDtype::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(m, (row as *const i16).add(at)),
        ))),
        KvDtype::Q8_0 => {
            // `d · q`, exact in f32, as the scalar twin's `value`.
            let block = (row as *const Q8Block).add(at / Q8_VALUES);
            let q = _mm_maskz_loadu_epi8(m, value_at(row, at));
            let d = _mm512_cvtph_ps(_mm256_set1_epi16((*block).d.to_bits() as i16));
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d)
        }
    }
}

/// Where value `at` of the cache row at `row` is stored.
#[inline(always)]
unsafe fn value_at<T: KvElement>(row: *const T, at: usize) -> *const i8 {
    if T::DTYPE == KvDtype::Q8_0 {
        let block = (row as *const Q8Block).add(at / Q8_VALUES);
        (std::ptr::addr_of!((*block).qs) as *const i8).add(at % Q8_VALUES)
    } else {
        (row as *const i8).add(at * std::mem::size_of::<T>())
    }
}

/// The 8 cache values of `[0, len)` at `base + at` as f32, zeros past `len`.
#[inline(always)]
unsafe fn load8_kv<T: KvElement>(base: *const T, at: usize, len: usize) -> __m256 {
    if T::DTYPE == KvDtype::F32 {
        return load8(base as *const f32, at, len);
    }
    if T::DTYPE == KvDtype::Q8_0 {
        // Whole blocks of 32: never a tail. `d · q`, exact, as the scalar twin's `value`.
        let block = (base as *const Q8Block).add(at / Q8_VALUES);
        let q = _mm_loadl_epi64(value_at(base, at) as *const __m128i);
        let d = _mm256_cvtph_ps(_mm_set1_epi16((*block).d.to_bits() as i16));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
    let bits = if at + 8 <= len {
        _mm_loadu_si128(base.add(at) as *const __m128i)
    } else {
        // A tail (a head_dim that is not a multiple of 8): AVX2 has no 16-bit masked load.
        let mut tail = [0u16; 8];
        let valid = len.saturating_sub(at).min(8);
        std::ptr::copy_nonoverlapping(base.add(at) as *const u16, tail.as_mut_ptr(), valid);
        _mm_loadu_si128(tail.as_ptr() as *const __m128i)
    };
    if T::DTYPE == KvDtype::F16 {
        _mm256_cvtph_ps(bits)
    } else {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    }
}

/// Lanes of `[0, len)` that exist past `at`, as AVX-512's mask.
#[inline(always)]
fn mask16(at: usize, len: usize) -> __mmask16 {
    let valid = len.saturating_sub(at).min(16);
    ((1u32 << valid) - 1) as __mmask16
}

/// The fixed tree over 16 partial sums (`l + l+8`, `l + l+4`, `l + l+2`, `0 + 1`).
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce_halves(lo: __m256, hi: __m256) -> f32 {
    let r8 = _mm256_add_ps(lo, hi);
    let r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps::<1>(r8));
    let r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    _mm_cvtss_f32(_mm_add_ss(r2, _mm_movehdup_ps(r2)))
}

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn reduce16(t: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(t)));
    reduce_halves(_mm512_castps512_ps256(t), hi)
}

/// [`crate::attention::exp`] of 16 lanes.
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn exp16(x_in: __m512) -> __m512 {
    let x = _mm512_max_ps(x_in, _mm512_set1_ps(EXP_MIN));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let z = _mm512_mul_ps(r, r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, z, r), _mm512_set1_ps(1.0));
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let in_range = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x_in, _mm512_set1_ps(EXP_MIN));
    _mm512_maskz_mul_ps(in_range, y, _mm512_castsi512_ps(e))
}

/// Asks for position `j`'s row of `base` (`rows.k` or `rows.v`) ahead of its use.
#[inline(always)]
unsafe fn prefetch_row<const HINT: i32, T: KvElement>(
    rows: &Rows<'_, T>,
    base: *const T,
    j: usize,
) {
    let row = base.add(*rows.offsets.get_unchecked(j)) as *const i8;
    let bytes = rows.head_dim / T::VALUES * std::mem::size_of::<T>();
    for line in 0..bytes.div_ceil(64) {
        _mm_prefetch::<HINT>(row.add(64 * line));
    }
}

/// The masks of one 64-float group's four vectors: all lanes, except in the last group of a
/// `head_dim` that is not a multiple of 64.
#[inline(always)]
fn group_masks(g: usize, hd: usize) -> [__mmask16; 4] {
    [0, 1, 2, 3].map(|c| mask16(g * 64 + c * 16, hd))
}

/// A dot product's 64 lanes (four vectors) folded to 16: `(l + l+16) + (l+32 + l+48)`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fold64(acc: [__m512; 4]) -> __m512 {
    _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))
}

/// A dot product's 64 lanes folded to 16 ([`fold64`]); `last` masks the final group.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn partial_dot<T: KvElement>(
    q: *const f32,
    row: *const T,
    groups: usize,
    last: [__mmask16; 4],
) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 4];
    for g in 0..groups {
        let full = g + 1 < groups;
        for (c, acc) in acc.iter_mut().enumerate() {
            let at = g * 64 + c * 16;
            let m = if full { 0xffff } else { last[c] };
            let a = _mm512_maskz_loadu_ps(m, q.add(at));
            let b = load16(row, at, m);
            *acc = _mm512_fmadd_ps(a, b, *acc);
        }
    }
    fold64(acc)
}

/// The scores of positions `j..j + 16` for `H` heads (queries at `q`, one row of `hd` after
/// another; scores stored at `s + h·n`), scaled by `scale` after the trees: each
/// K row is loaded (and widened) once for all `H` heads. The same operations per (head,
/// position) as [`partial_dot`], then the sixteen trees reduced together (`transposed`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn scores16<const H: usize, T: KvElement>(
    rows: &Rows<'_, T>,
    q: *const f32,
    s: *mut f32,
    n: usize,
    j: usize,
    groups: usize,
    last: [__mmask16; 4],
) {
    let hd = rows.head_dim;
    let k = rows.k.as_ptr();
    // Every (head, position) partial sum is written below before it is read: no zeroing of
    // the 16·H vectors (which live in memory) for each call.
    let mut t = std::mem::MaybeUninit::<[[__m512; 16]; H]>::uninit();
    let tp = t.as_mut_ptr() as *mut __m512;
    if groups == 1 {
        // A head of at most 64 values: its query stays in registers for the 16 positions.
        let mut qv = [[_mm512_setzero_ps(); 4]; H];
        for (h, qv) in qv.iter_mut().enumerate() {
            for (c, qv) in qv.iter_mut().enumerate() {
                *qv = _mm512_maskz_loadu_ps(last[c], q.add(h * hd + c * 16));
            }
        }
        for i in 0..16 {
            let row = k.add(*rows.offsets.get_unchecked(j + i));
            let mut kv = [_mm512_setzero_ps(); 4];
            for (c, kv) in kv.iter_mut().enumerate() {
                *kv = load16(row, c * 16, last[c]);
            }
            for (h, qv) in qv.iter().enumerate() {
                let mut acc = [_mm512_setzero_ps(); 4];
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(qv[c], kv[c], *acc);
                }
                tp.add(h * 16 + i).write(fold64(acc));
            }
        }
    } else {
        for i in 0..16 {
            let row = k.add(*rows.offsets.get_unchecked(j + i));
            let mut acc = [[_mm512_setzero_ps(); 4]; H];
            for g in 0..groups {
                let full = g + 1 < groups;
                let mut kv = [_mm512_setzero_ps(); 4];
                for (c, kv) in kv.iter_mut().enumerate() {
                    let m = if full { 0xffff } else { last[c] };
                    *kv = load16(row, g * 64 + c * 16, m);
                }
                for (h, acc) in acc.iter_mut().enumerate() {
                    for (c, acc) in acc.iter_mut().enumerate() {
                        let at = g * 64 + c * 16;
                        let m = if full { 0xffff } else { last[c] };
                        let a = _mm512_maskz_loadu_ps(m, q.add(h * hd + at));
                        *acc = _mm512_fmadd_ps(a, kv[c], *acc);
                    }
                }
            }
            for (h, acc) in acc.into_iter().enumerate() {
                tp.add(h * 16 + i).write(fold64(acc));
            }
        }
    }
    // SAFETY: the loops above wrote all 16 positions of every head.
    let t = t.assume_init();
    let scale = _mm512_set1_ps(rows.scale);
    for (h, t) in t.into_iter().enumerate() {
        _mm512_storeu_ps(s.add(h * n), _mm512_mul_ps(transposed(t), scale));
    }
}

/// `out[h] = Σ_j p[h][j] · v_j` over one 64-float group `g` for `H` heads at once, so each V
/// row is loaded once for all of them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn weighted_sum<const H: usize, T: KvElement>(
    rows: &Rows<'_, T>,
    p: *const f32,
    o: *mut f32,
    g: usize,
) {
    let (hd, n) = (rows.head_dim, rows.offsets.len());
    let masks = group_masks(g, hd);
    let v = rows.v.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 4]; H];
    for j in 0..n {
        if j + 8 < n {
            let ahead = value_at(v.add(*rows.offsets.get_unchecked(j + 8)), g * 64);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
        }
        let row = v.add(*rows.offsets.get_unchecked(j));
        let mut x = [_mm512_setzero_ps(); 4];
        for (c, x) in x.iter_mut().enumerate() {
            *x = load16(row, g * 64 + c * 16, masks[c]);
        }
        for (h, acc) in acc.iter_mut().enumerate() {
            let pj = _mm512_set1_ps(*p.add(h * n + j));
            for (acc, x) in acc.iter_mut().zip(x) {
                *acc = _mm512_fmadd_ps(pj, x, *acc);
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(o.add(h * hd + g * 64 + c * 16), masks[c], *acc);
        }
    }
}

/// [`reduce16`] of 16 vectors at once: lane `i` of the result is the tree of `t[i]`. Each
/// level pairs the same lanes as the tree (`l + l+8`, `l + l+4`, `l + l+2`, `0 + 1`) while
/// packing two vectors' halves into one, so four levels of shuffles and adds do the work of
/// sixteen separate trees.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transposed(t: [__m512; 16]) -> __m512 {
    // u[m]: lanes 0..8 the first level of t[2m], lanes 8..16 that of t[2m + 1].
    let mut u = [_mm512_setzero_ps(); 8];
    for (m, u) in u.iter_mut().enumerate() {
        let (a, b) = (t[2 * m], t[2 * m + 1]);
        *u = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xee>(a, b),
        );
    }
    // w[p]: 128-bit lane x holds the second level of t[4p + x].
    let mut w = [_mm512_setzero_ps(); 4];
    for (p, w) in w.iter_mut().enumerate() {
        let (a, b) = (u[2 * p], u[2 * p + 1]);
        *w = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xdd>(a, b),
        );
    }
    // x[s]: lane x holds the third level of t[8s + x] (2 floats) and of t[8s + 4 + x].
    let mut x = [_mm512_setzero_ps(); 2];
    for (s, x) in x.iter_mut().enumerate() {
        let (a, b) = (_mm512_castps_pd(w[2 * s]), _mm512_castps_pd(w[2 * s + 1]));
        *x = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    // Lane 4x + y is the tree of t[x + 4y]; put it at lane x + 4y.
    let y = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(x[0], x[1]),
        _mm512_shuffle_ps::<0xdd>(x[0], x[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, y)
}

/// # Safety
/// The CPU must have AVX-512 F/BW/VL, AVX2, F16C and FMA; `rows.offsets` must be inside
/// `rows.k` and `rows.v` (with `head_dim` values each), `scores` `heads × positions` and `out`
/// `q`'s size.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
pub(crate) unsafe fn attend_avx512<T: KvElement>(
    rows: &Rows<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [[f32; 2]],
) {
    let (hd, n, scale) = (rows.head_dim, rows.offsets.len(), rows.scale);
    let heads = rows.q.len() / hd;
    let (q, k) = (rows.q.as_ptr(), rows.k.as_ptr());
    let s = scores.as_mut_ptr();
    let groups = hd.div_ceil(64);
    let last = group_masks(groups - 1, hd);

    // Scores. Sixteen positions at a time, every head over them while their K rows are in L1,
    // with the sixteen trees reduced together (`transposed`); the rest one by one.
    // A position's row is a few cache lines a whole slot apart from the next one's, which the
    // hardware prefetchers do not follow across pages: the next block's K rows and this
    // block's V rows (read after the softmax) are asked for ahead.
    let mut j = 0;
    while j + 16 <= n {
        for i in j + 16..(j + 32).min(n) {
            prefetch_row::<_MM_HINT_T0, T>(rows, k, i);
        }
        for i in j + 32..(j + 64).min(n) {
            prefetch_row::<_MM_HINT_T2, T>(rows, k, i);
        }
        for i in j..j + 16 {
            prefetch_row::<_MM_HINT_T1, T>(rows, rows.v.as_ptr(), i);
        }
        let mut h = 0;
        while h < heads {
            let (qh, sh) = (q.add(h * hd), s.add(h * n + j));
            match heads - h {
                1 => scores16::<1, T>(rows, qh, sh, n, j, groups, last),
                2 => scores16::<2, T>(rows, qh, sh, n, j, groups, last),
                3 => scores16::<3, T>(rows, qh, sh, n, j, groups, last),
                _ => scores16::<4, T>(rows, qh, sh, n, j, groups, last),
            }
            h += 4;
        }
        j += 16;
    }
    for j in j..n {
        let row = k.add(*rows.offsets.get_unchecked(j));
        for h in 0..heads {
            let t = partial_dot(q.add(h * hd), row, groups, last);
            *s.add(h * n + j) = reduce16(t) * scale;
        }
    }

    for (h, stats) in stats.iter_mut().enumerate().take(heads) {
        *stats = softmax_avx512(s.add(h * n), n);
    }

    // Σ p_j · v_j, 64 outputs of up to four heads at a time.
    let o = out.as_mut_ptr();
    for g in 0..groups {
        let mut h = 0;
        while h < heads {
            let (p, oh) = (s.add(h * n) as *const f32, o.add(h * hd));
            match heads - h {
                1 => weighted_sum::<1, T>(rows, p, oh, g),
                2 => weighted_sum::<2, T>(rows, p, oh, g),
                3 => weighted_sum::<3, T>(rows, p, oh, g),
                _ => weighted_sum::<4, T>(rows, p, oh, g),
            }
            h += 4;
        }
    }
}

/// The lanes of `[0, len)` that exist past `at`, as AVX2's mask (all ones where they do).
#[inline(always)]
unsafe fn mask8(at: usize, len: usize) -> __m256i {
    let valid = len.saturating_sub(at).min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(valid),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The 8 floats of `[0, len)` at `base + at`, zeros past `len`: a plain load where all 8
/// exist (AVX2's masked loads are slow on some CPUs).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load8(base: *const f32, at: usize, len: usize) -> __m256 {
    if at + 8 <= len {
        _mm256_loadu_ps(base.add(at))
    } else {
        _mm256_maskload_ps(base.add(at), mask8(at, len))
    }
}

/// Stores the lanes of `x` that fall in `[0, len)` at `base + at`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store8(base: *mut f32, at: usize, len: usize, x: __m256) {
    if at + 8 <= len {
        _mm256_storeu_ps(base.add(at), x)
    } else {
        _mm256_maskstore_ps(base.add(at), mask8(at, len), x)
    }
}

/// [`crate::attention::exp`] of 8 lanes.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(x_in: __m256) -> __m256 {
    let x = _mm256_max_ps(x_in, _mm256_set1_ps(EXP_MIN));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let z = _mm256_mul_ps(r, r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), _mm256_set1_ps(1.0));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    let in_range = _mm256_cmp_ps::<_CMP_GE_OQ>(x_in, _mm256_set1_ps(EXP_MIN));
    _mm256_and_ps(in_range, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))
}

/// Softmax of the `n` floats at `p` in place: max, exp, 16 partial sums, normalise; returns
/// the max and the sum.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2 and FMA; `p` points at `n` floats.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn softmax_avx512(p: *mut f32, n: usize) -> [f32; 2] {
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    for at in (0..n).step_by(16) {
        let x = _mm512_mask_loadu_ps(mv, mask16(at, n), p.add(at));
        mv = _mm512_max_ps(mv, x);
    }
    let top = _mm512_reduce_max_ps(mv);
    let max = _mm512_set1_ps(top);
    let mut lanes = _mm512_setzero_ps();
    for at in (0..n).step_by(16) {
        let m = mask16(at, n);
        let x = _mm512_maskz_loadu_ps(m, p.add(at));
        let e = exp16(_mm512_sub_ps(x, max));
        _mm512_mask_storeu_ps(p.add(at), m, e);
        lanes = _mm512_mask_add_ps(lanes, m, lanes, e);
    }
    let sum = reduce16(lanes);
    let inv = _mm512_set1_ps(1.0 / sum);
    for at in (0..n).step_by(16) {
        let m = mask16(at, n);
        let x = _mm512_maskz_loadu_ps(m, p.add(at));
        _mm512_mask_storeu_ps(p.add(at), m, _mm512_mul_ps(x, inv));
    }
    [top, sum]
}

/// Softmax of the `n` floats at `p` in place, as [`softmax_avx512`] computes it.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `p` points at `n` floats.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax_avx2(p: *mut f32, n: usize) -> [f32; 2] {
    let mut top = f32::NEG_INFINITY;
    for j in 0..n {
        top = top.max(*p.add(j));
    }
    let max = _mm256_set1_ps(top);
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for at in (0..n).step_by(16) {
        for (half, lanes) in [&mut lo, &mut hi].into_iter().enumerate() {
            let at = at + 8 * half;
            let m = mask8(at, n);
            let x = load8(p, at, n);
            let e = exp8(_mm256_sub_ps(x, max));
            _mm256_maskstore_ps(p.add(at), m, e);
            *lanes = _mm256_add_ps(*lanes, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
        }
    }
    let sum = reduce_halves(lo, hi);
    let inv = _mm256_set1_ps(1.0 / sum);
    for at in (0..n).step_by(8) {
        store8(p, at, n, _mm256_mul_ps(load8(p, at, n), inv));
    }
    [top, sum]
}

/// # Safety
/// As [`attend_avx512`], with AVX2, F16C and FMA.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn attend_avx2<T: KvElement>(
    rows: &Rows<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [[f32; 2]],
) {
    let (hd, n, scale) = (rows.head_dim, rows.offsets.len(), rows.scale);
    let (k, v) = (rows.k.as_ptr(), rows.v.as_ptr());
    let groups = hd.div_ceil(64);
    // Scores, position by position with every head while the K row is in L1; rows ahead are
    // asked for as in `attend_avx512`.
    for j in 0..n {
        if j + 16 < n {
            prefetch_row::<_MM_HINT_T0, T>(rows, k, j + 16);
        }
        prefetch_row::<_MM_HINT_T1, T>(rows, v, j);
        let row = k.add(*rows.offsets.get_unchecked(j));
        // A row of at most 64 values is loaded (and widened) once for every head; a longer
        // one, group by group for each head (the accumulators and the row would not both fit
        // AVX2's sixteen registers).
        let mut kr = [_mm256_setzero_ps(); 8];
        if groups == 1 {
            for (c, kr) in kr.iter_mut().enumerate() {
                *kr = load8_kv(row, c * 8, hd);
            }
        }
        for (h, q) in rows.q.chunks_exact(hd).enumerate() {
            let q = q.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 8];
            if groups == 1 {
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(load8(q, c * 8, hd), kr[c], *acc);
                }
            } else {
                for g in 0..groups {
                    for (c, acc) in acc.iter_mut().enumerate() {
                        let at = g * 64 + c * 8;
                        *acc = _mm256_fmadd_ps(load8(q, at, hd), load8_kv(row, at, hd), *acc);
                    }
                }
            }
            // Lanes 0..8 of the 16 are accumulators 0, 2, 4, 6; lanes 8..16 are 1, 3, 5, 7.
            let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[4], acc[6]));
            let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[3]), _mm256_add_ps(acc[5], acc[7]));
            *scores.get_unchecked_mut(h * n + j) = reduce_halves(lo, hi) * scale;
        }
    }
    for ((s, o), stats) in scores
        .chunks_exact_mut(n)
        .zip(out.chunks_exact_mut(hd))
        .zip(stats.iter_mut())
    {
        let p = s.as_mut_ptr();
        *stats = softmax_avx2(p, n);

        let o = o.as_mut_ptr();
        for g in 0..groups {
            let mut acc = [_mm256_setzero_ps(); 8];
            for j in 0..n {
                let pj = _mm256_set1_ps(*p.add(j));
                let row = v.add(rows.offsets[j]);
                for (c, acc) in acc.iter_mut().enumerate() {
                    let at = g * 64 + c * 8;
                    *acc = _mm256_fmadd_ps(pj, load8_kv(row, at, hd), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                let at = g * 64 + c * 8;
                store8(o, at, hd, *acc);
            }
        }
    }
}
