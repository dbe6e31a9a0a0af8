//! Decode attention over a paged KV cache (f32, f16 or bf16): the query heads of one token
//! that share one KV head, over a window of their sequence's positions, read in place through
//! the block table.
//!
//! One call scores every K row of the window for all the group's heads, takes each head's
//! softmax and sums the V rows. A 16-bit cache is widened to f32 as it is read (exactly), so
//! the arithmetic is the same for every cache type. Every level performs the same float
//! operations in the same order, so all levels give the scalar twin's bits:
//! - a dot product keeps 64 partial sums (input `d` goes to lane `d % 64`, fused multiply-add,
//!   inputs in order), combined as `(l + l+16) + (l+32 + l+48)` and then halved in a fixed tree
//!   (`l + l+8`, `l + l+4`, `l + l+2`, `0 + 1`);
//! - `exp` is one polynomial (Cephes' single-precision one, fused multiply-adds) on `s - max`,
//!   0 below -87, and the softmax's sum keeps 16 partial sums (position `j` to lane `j % 16`)
//!   halved in the same tree;
//! - each output element sums `p_j · v_j` with fused multiply-adds, positions in order.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use half::slice::HalfFloatSliceExt;
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};

use crate::Level;

/// The element type of a KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// Half the memory and read traffic of f32; 10 mantissa bits (K and V rows are small and
    /// normalised, well inside f16's range).
    #[default]
    F16,
    /// Half the memory of f32, f32's range, 7 mantissa bits.
    Bf16,
    F32,
    /// ggml's Q8_0: blocks of 32 values as 8-bit integers with one f16 scale (34 bytes), a
    /// quarter of f32's memory; a `head_dim` must be a multiple of 32. The kernels read it in
    /// place, each value as `d · q` (exact in f32).
    Q8_0,
}

impl KvDtype {
    pub const ALL: [KvDtype; 4] = [KvDtype::F16, KvDtype::Bf16, KvDtype::F32, KvDtype::Q8_0];

    /// Bytes that `values` values take (for Q8_0, a multiple of 32 values).
    pub fn bytes(self, values: usize) -> usize {
        match self {
            KvDtype::F16 | KvDtype::Bf16 => 2 * values,
            KvDtype::F32 => 4 * values,
            KvDtype::Q8_0 => values / Q8_VALUES * std::mem::size_of::<Q8Block>(),
        }
    }

    /// Why rows of `head_dim` values cannot be stored in this type, if they cannot.
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        if self == KvDtype::Q8_0 && !head_dim.is_multiple_of(Q8_VALUES) {
            return Err(format!(
                "a q8_0 KV cache needs head_dim to be a multiple of {Q8_VALUES}, got {head_dim}"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
            KvDtype::Q8_0 => "q8_0",
        })
    }
}

impl FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "fp16" => Ok(KvDtype::F16),
            "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "f32" | "float32" | "fp32" => Ok(KvDtype::F32),
            "q8_0" | "q8" => Ok(KvDtype::Q8_0),
            other => Err(format!(
                "unknown KV cache dtype {other:?} (expected f16, bf16, f32 or q8_0)"
            )),
        }
    }
}

mod sealed {
    use super::Q8Block;

    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for Q8Block {}
}

/// Buffers of one window's attention: each position's row offset, and the scores.
#[derive(Debug, Clone, Default)]
struct WindowBufs {
    offsets: Vec<usize>,
    scores: Vec<f32>,
}

/// Values per [`Q8Block`].
pub const Q8_VALUES: usize = 32;

/// 32 values as `d · q`: ggml's `block_q8_0` (`d` = the block's largest magnitude / 127).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct Q8Block {
    pub d: f16,
    pub qs: [i8; Q8_VALUES],
}

/// An element of a KV cache, read as f32: a value (f32, f16, bf16) or a block of
/// [`KvElement::VALUES`] values (Q8_0). A row of `head_dim` values is `head_dim / VALUES`
/// elements.
pub trait KvElement: Copy + Default + Send + Sync + 'static + sealed::Sealed {
    const DTYPE: KvDtype;
    /// Values one element holds.
    const VALUES: usize = 1;
    /// `src` (`dst.len() · VALUES` values) stored: rounded to nearest, ties to even (f16,
    /// bf16), or quantized block by block (Q8_0); vectorised where the CPU can.
    fn from_f32_slice(dst: &mut [Self], src: &[f32]);
    /// The values `src` holds (`src.len() · VALUES`), exactly; vectorised where the CPU can.
    fn to_f32_slice(dst: &mut [f32], src: &[Self]);
    /// A zeroed vector of `n` elements, from zeroed pages (touched only when written).
    fn zeroed(n: usize) -> Vec<Self>;
    /// Value `i` of the row whose elements are `row`.
    fn value(row: &[Self], i: usize) -> f32;
}

impl KvElement for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn to_f32_slice(dst: &mut [f32], src: &[Self]) {
        dst.copy_from_slice(src);
    }
    fn zeroed(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
    #[inline(always)]
    fn value(row: &[Self], i: usize) -> f32 {
        row[i]
    }
}

/// The 16-bit elements: slices converted by [`crate::convert`] (vectorised; bf16 narrowed by
/// `half`); zeroed from a `u16` allocation, since `vec![f16::ZERO; n]` would write every value
/// where `vec![0u16; n]` gets zeroed pages.
macro_rules! half_element {
    ($t:ty, $dtype:expr, $narrow:expr, $widen:expr) => {
        impl KvElement for $t {
            const DTYPE: KvDtype = $dtype;
            fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
                $narrow(src, dst);
            }
            fn to_f32_slice(dst: &mut [f32], src: &[Self]) {
                $widen(src, dst);
            }
            fn zeroed(n: usize) -> Vec<Self> {
                vec![0u16; n].reinterpret_into()
            }
            #[inline(always)]
            fn value(row: &[Self], i: usize) -> f32 {
                row[i].to_f32()
            }
        }
    };
}

half_element!(
    f16,
    KvDtype::F16,
    crate::convert::f32_to_f16,
    crate::convert::f16_to_f32
);
half_element!(
    bf16,
    KvDtype::Bf16,
    |src: &[f32], dst: &mut [bf16]| dst.convert_from_f32_slice(src),
    crate::convert::bf16_to_f32
);

impl KvElement for Q8Block {
    const DTYPE: KvDtype = KvDtype::Q8_0;
    const VALUES: usize = Q8_VALUES;
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        assert_eq!(src.len(), dst.len() * Q8_VALUES, "q8_0 blocks of 32 values");
        for (block, x) in dst.iter_mut().zip(src.chunks_exact(Q8_VALUES)) {
            let (d, qs) = crate::format::q8_0_block(x);
            *block = Q8Block { d, qs };
        }
    }
    fn to_f32_slice(dst: &mut [f32], src: &[Self]) {
        crate::convert::q8_to_f32(src, dst);
    }
    fn zeroed(n: usize) -> Vec<Self> {
        vec![Q8Block::default(); n]
    }
    #[inline(always)]
    fn value(row: &[Self], i: usize) -> f32 {
        let block = &row[i / Q8_VALUES];
        block.qs[i % Q8_VALUES] as f32 * block.d.to_f32()
    }
}

/// One layer's paged cache, head-major inside each block: block `b` holds its `block_size`
/// positions of KV head 0, then of head 1, …, each position `head_dim` values, so position `i`
/// of head `g` is at `((b · kv_heads + g) · block_size + i) · head_dim`. A head's positions in
/// a block are contiguous: attention reads them as one run. Position `p` of a sequence is
/// position `p % block_size` of block `block_table[p / block_size]`.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a, T> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub kv_heads: usize,
    pub block_size: usize,
}

impl<T> PagedKv<'_, T> {
    /// Where position `i` of block `block`'s KV head `head` starts (an index into `k` and
    /// `v`), for rows of `row_len` elements (`head_dim / T::VALUES`).
    #[inline(always)]
    pub fn at(&self, block: usize, head: usize, i: usize, row_len: usize) -> usize {
        let (kv_heads, block_size) = (self.kv_heads, self.block_size);
        KvLayout {
            kv_heads,
            block_size,
            row_len,
        }
        .at(block, head, i)
    }
}

/// The geometry of [`PagedKv`]'s blocks, for code that writes or copies the cache.
#[derive(Debug, Clone, Copy)]
pub struct KvLayout {
    pub kv_heads: usize,
    pub block_size: usize,
    /// Elements per row: `head_dim / T::VALUES` (values, or Q8_0 blocks of 32).
    pub row_len: usize,
}

impl KvLayout {
    /// Where position `i` of block `block`'s KV head `head` starts.
    #[inline(always)]
    pub fn at(&self, block: usize, head: usize, i: usize) -> usize {
        ((block * self.kv_heads + head) * self.block_size + i) * self.row_len
    }
}

/// The query heads of one token that share one KV head.
#[derive(Debug, Clone, Copy)]
pub struct HeadGroup<'a> {
    /// `[heads, head_dim]`, one row per query head.
    pub q: &'a [f32],
    pub head_dim: usize,
    /// The KV head they share.
    pub kv_head: usize,
    /// Scores are `scale · q·k`.
    pub scale: f32,
}

/// Buffers one thread reuses across calls of [`attend`].
#[derive(Debug, Clone, Default)]
pub struct AttendScratch {
    bufs: WindowBufs,
    stats: Vec<[f32; 2]>,
}

/// Windows longer than this many positions are attended in partitions of it, in parallel, and
/// the partitions merged by their softmax maxima and sums (flash-decoding): one long sequence
/// then keeps every core busy even with fewer KV heads than cores. The partitions follow from
/// the window alone, so a token's result does not depend on the rest of the batch.
pub const ATTEND_PARTITION: usize = 512;

/// `out` (`[heads, head_dim]`) = softmax(`scale · q·kᵀ`) · V over positions `window` of the
/// sequence whose blocks are `block_table`, at `level` (lowered to what the CPU has).
///
/// # Panics
/// If the window is empty, a shape disagrees, or a position of the window falls outside the
/// block table or the cache.
pub fn attend<T: KvElement>(
    level: Level,
    heads: &HeadGroup<'_>,
    kv: &PagedKv<'_, T>,
    block_table: &[u32],
    window: Range<usize>,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let hd = heads.head_dim;
    assert!(
        hd > 0 && heads.q.len().is_multiple_of(hd),
        "query of {} floats is not whole heads of {hd}",
        heads.q.len()
    );
    assert_eq!(out.len(), heads.q.len(), "attention output size");
    assert!(!window.is_empty(), "attention over no positions");
    assert!(
        heads.kv_head < kv.kv_heads && kv.block_size > 0 && kv.k.len() == kv.v.len(),
        "KV head {} of {}, blocks of {}",
        heads.kv_head,
        kv.kv_heads,
        kv.block_size
    );
    let group = heads.q.len() / hd;
    if window.len() <= ATTEND_PARTITION {
        let AttendScratch { bufs, stats } = scratch;
        stats.resize(group, [0.0; 2]);
        attend_window(level, heads, kv, block_table, window, bufs, out, stats);
        return;
    }
    use rayon::prelude::*;
    let parts = window.len().div_ceil(ATTEND_PARTITION);
    // Partition `i`'s output at `[i * group * hd..]`, its per-head max and sum at `[i * group..]`.
    let mut outs = vec![0f32; parts * group * hd];
    let mut stats = vec![[0f32; 2]; parts * group];
    outs.par_chunks_mut(group * hd)
        .zip(stats.par_chunks_mut(group))
        .enumerate()
        .for_each_init(WindowBufs::default, |bufs, (i, (o, st))| {
            let start = window.start + i * ATTEND_PARTITION;
            let part = start..(start + ATTEND_PARTITION).min(window.end);
            attend_window(level, heads, kv, block_table, part, bufs, o, st);
        });
    merge(&outs, &stats, group, hd, out);
}

/// Joins partitions' outputs (each normalised by its own sum; `outs` and `stats` as
/// [`attend`] lays them out) into the window's: partition `i` weighs `sumᵢ · exp(maxᵢ − max)`,
/// in partition order. One code path for every level.
fn merge(outs: &[f32], stats: &[[f32; 2]], group: usize, hd: usize, out: &mut [f32]) {
    let parts = stats.len() / group;
    let mut weights = Vec::with_capacity(parts);
    for (h, o) in out.chunks_exact_mut(hd).enumerate() {
        let head = |i: usize| stats[i * group + h];
        let max = (0..parts).fold(f32::NEG_INFINITY, |m, i| m.max(head(i)[0]));
        weights.clear();
        weights.extend((0..parts).map(|i| head(i)[1] * exp(head(i)[0] - max)));
        let total: f32 = weights.iter().sum();
        o.fill(0.0);
        for (i, w) in weights.iter().enumerate() {
            let c = w / total;
            let part = &outs[(i * group + h) * hd..][..hd];
            for (o, &x) in o.iter_mut().zip(part) {
                *o += c * x;
            }
        }
    }
}

/// [`attend`] over one window in one pass, reading the cache in place; `stats` gets each
/// head's softmax max and sum.
#[allow(clippy::too_many_arguments)]
fn attend_window<T: KvElement>(
    level: Level,
    heads: &HeadGroup<'_>,
    kv: &PagedKv<'_, T>,
    block_table: &[u32],
    window: Range<usize>,
    bufs: &mut WindowBufs,
    out: &mut [f32],
    stats: &mut [[f32; 2]],
) {
    let hd = heads.head_dim;
    assert!(
        hd.is_multiple_of(T::VALUES),
        "rows of {hd} values in a {} cache",
        T::DTYPE
    );
    let units = hd / T::VALUES;
    let WindowBufs { offsets, scores } = bufs;
    offsets.clear();
    // Block by block: a block's positions are consecutive rows.
    let mut p = window.start;
    while p < window.end {
        let block = *block_table
            .get(p / kv.block_size)
            .unwrap_or_else(|| panic!("position {p} is past the block table"));
        let (i, run) = (
            p % kv.block_size,
            (kv.block_size - p % kv.block_size).min(window.end - p),
        );
        let at = kv.at(block as usize, heads.kv_head, i, units);
        assert!(
            at + run * units <= kv.k.len(),
            "position {} is outside the cache",
            p + run - 1
        );
        offsets.extend((0..run).map(|r| at + r * units));
        p += run;
    }
    let n = window.len();
    let group = heads.q.len() / hd;
    scores.clear();
    scores.resize(group * n, 0.0);
    let rows = Rows {
        q: heads.q,
        head_dim: hd,
        scale: heads.scale,
        k: kv.k,
        v: kv.v,
        offsets,
    };
    match level.capped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `capped` only yields levels the CPU runs; every offset was checked above.
        Level::Avx512 => unsafe { crate::x86::attention::attend_avx512(&rows, scores, out, stats) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::attention::attend_avx2(&rows, scores, out, stats) },
        _ => scalar(&rows, scores, out, stats),
    }
}

/// What one [`attend`] call computes over, with every row's offset checked against `k` and `v`.
pub(crate) struct Rows<'a, T> {
    pub q: &'a [f32],
    pub head_dim: usize,
    pub scale: f32,
    pub k: &'a [T],
    pub v: &'a [T],
    /// Where each position's row (`head_dim / T::VALUES` elements) starts in `k` and `v`.
    pub offsets: &'a [usize],
}

/// Lanes of a dot product's partial sums.
pub(crate) const DOT_LANES: usize = 64;
/// Lanes of the softmax sum's partial sums.
pub(crate) const SUM_LANES: usize = 16;
/// Below this (where `2^n` would no longer be a normal float), and for NaN, `exp` gives 0.
pub(crate) const EXP_MIN: f32 = -87.0;
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts: `n · LN2_HI` is exact for the `n` that occur.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = 2.121_944_4e-4;
/// The polynomial of `(exp(r) - 1 - r) / r²`, highest degree first.
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `exp(x)` for `x ≤ 0`, as every level computes it: 0 below [`EXP_MIN`] and for NaN (so a
/// score of -inf weighs nothing).
pub(crate) fn exp(x: f32) -> f32 {
    if x.is_nan() || x < EXP_MIN {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(LN2_LO, r);
    let z = r * r;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(z, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The fixed halving tree over 16 partial sums.
fn reduce16(t: &[f32; 16]) -> f32 {
    let r8: [f32; 8] = std::array::from_fn(|l| t[l] + t[l + 8]);
    let r4: [f32; 4] = std::array::from_fn(|l| r8[l] + r8[l + 4]);
    let r2: [f32; 2] = std::array::from_fn(|l| r4[l] + r4[l + 2]);
    r2[0] + r2[1]
}

/// `a · row`, `row` being the elements of `a.len()` values.
fn dot<T: KvElement>(a: &[f32], row: &[T]) -> f32 {
    let mut acc = [0f32; DOT_LANES];
    for (d, x) in a.iter().enumerate() {
        let lane = &mut acc[d % DOT_LANES];
        *lane = x.mul_add(T::value(row, d), *lane);
    }
    let t: [f32; 16] =
        std::array::from_fn(|l| (acc[l] + acc[l + 16]) + (acc[l + 32] + acc[l + 48]));
    reduce16(&t)
}

/// Returns the max and the sum, as the SIMD levels do.
fn scalar_softmax(s: &mut [f32]) -> [f32; 2] {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut lanes = [0f32; SUM_LANES];
    for (j, x) in s.iter_mut().enumerate() {
        *x = exp(*x - max);
        lanes[j % SUM_LANES] += *x;
    }
    let sum = reduce16(&lanes);
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
    [max, sum]
}

/// The portable twin every SIMD level is tested against.
pub(crate) fn scalar<T: KvElement>(
    rows: &Rows<'_, T>,
    scores: &mut [f32],
    out: &mut [f32],
    stats: &mut [[f32; 2]],
) {
    let (hd, n) = (rows.head_dim, rows.offsets.len());
    let units = hd / T::VALUES;
    for (((q, s), o), stats) in rows
        .q
        .chunks_exact(hd)
        .zip(scores.chunks_exact_mut(n))
        .zip(out.chunks_exact_mut(hd))
        .zip(stats.iter_mut())
    {
        for (s, &at) in s.iter_mut().zip(rows.offsets) {
            *s = dot(q, &rows.k[at..at + units]) * rows.scale;
        }
        *stats = scalar_softmax(s);
        o.fill(0.0);
        for (&p, &at) in s.iter().zip(rows.offsets) {
            let row = &rows.v[at..at + units];
            for (d, o) in o.iter_mut().enumerate() {
                *o = p.mul_add(T::value(row, d), *o);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tests::{same_bits, Rng};

    #[test]
    fn exp_is_within_two_ulps_of_f64_over_its_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = EXP_MIN * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(EXP_MIN - 0.01), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::NAN), 0.0);
    }

    struct Case {
        group: usize,
        head_dim: usize,
        n: usize,
        block_size: usize,
        q_scale: f32,
    }

    /// Runs `case` through [`attend`] at `level` over a `T` cache, with the heads' KV head the
    /// second of two and a shuffled block table; returns the output and an f64 reference over
    /// the values the cache holds.
    fn run<T: KvElement>(case: &Case, level: Level, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let Case {
            group,
            head_dim: hd,
            n,
            block_size: bs,
            q_scale,
        } = *case;
        let mut rng = Rng(seed | 1);
        let mut r = || rng.next();
        // The window is the last `n` of `n + 3` positions; blocks in reverse order, one spare.
        let context = n + 3;
        let blocks = context.div_ceil(bs) + 1;
        let table: Vec<u32> = (0..blocks as u32 - 1).rev().map(|b| b + 1).collect();
        let kv_heads = 2;
        let values = blocks * kv_heads * bs * hd;
        let k: Vec<f32> = (0..values).map(|_| r()).collect();
        let v: Vec<f32> = (0..values).map(|_| r()).collect();
        // What the cache holds, stored and widened back.
        let (k, k_held) = stored::<T>(&k);
        let (v, v_held) = stored::<T>(&v);
        let q: Vec<f32> = (0..group * hd).map(|_| r() * q_scale).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = HeadGroup {
            q: &q,
            head_dim: hd,
            kv_head: 1,
            scale,
        };
        let kv = PagedKv {
            k: &k,
            v: &v,
            kv_heads,
            block_size: bs,
        };
        let mut out = vec![f32::NAN; group * hd];
        let window = 3..context;
        let mut scratch = AttendScratch::default();
        attend(
            level,
            &heads,
            &kv,
            &table,
            window.clone(),
            &mut scratch,
            &mut out,
        );

        let mut reference = vec![0f64; group * hd];
        for (h, o) in reference.chunks_exact_mut(hd).enumerate() {
            let at = |p: usize| ((table[p / bs] as usize * kv_heads + 1) * bs + p % bs) * hd;
            let s: Vec<f64> = window
                .clone()
                .map(|p| {
                    let kr = &k_held[at(p)..at(p) + hd];
                    let qh = &q[h * hd..(h + 1) * hd];
                    qh.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (p, e) in window.clone().zip(&e) {
                for (o, vv) in o.iter_mut().zip(&v_held[at(p)..at(p) + hd]) {
                    *o += e / sum * *vv as f64;
                }
            }
        }
        (out, reference)
    }

    /// `values` stored as `T` elements, and the values those hold.
    pub(crate) fn stored<T: KvElement>(values: &[f32]) -> (Vec<T>, Vec<f32>) {
        let mut elements = T::zeroed(values.len() / T::VALUES);
        T::from_f32_slice(&mut elements, values);
        let mut held = vec![0f32; values.len()];
        T::to_f32_slice(&mut held, &elements);
        (elements, held)
    }

    fn cases() -> Vec<Case> {
        let mut cases = Vec::new();
        for (group, head_dim) in [
            (1, 1),
            (3, 7),
            (4, 64),
            (2, 80),
            (1, 128),
            (3, 130),
            (6, 96),
        ] {
            for (n, block_size) in [(1, 1), (2, 16), (15, 3), (17, 16), (100, 7)] {
                cases.push(Case {
                    group,
                    head_dim,
                    n,
                    block_size,
                    q_scale: 1.0,
                });
            }
        }
        // Longer than a partition: attended in parts and merged (the last part short).
        for (group, head_dim, n) in [(3, 64, 1300), (1, 7, 2 * ATTEND_PARTITION + 1)] {
            cases.push(Case {
                group,
                head_dim,
                n,
                block_size: 16,
                q_scale: 1.0,
            });
        }
        // Scores far apart: most probabilities underflow to (clamped) zero.
        cases.push(Case {
            group: 2,
            head_dim: 64,
            n: 40,
            block_size: 16,
            q_scale: 300.0,
        });
        cases
    }

    /// [`run`] for the cache type `dtype` names.
    fn run_as(dtype: KvDtype, case: &Case, level: Level, seed: u64) -> (Vec<f32>, Vec<f64>) {
        match dtype {
            KvDtype::F32 => run::<f32>(case, level, seed),
            KvDtype::F16 => run::<f16>(case, level, seed),
            KvDtype::Bf16 => run::<bf16>(case, level, seed),
            KvDtype::Q8_0 => run::<Q8Block>(case, level, seed),
        }
    }

    /// The cases whose rows `dtype` stores (Q8_0: whole blocks of 32).
    fn cases_for(dtype: KvDtype) -> impl Iterator<Item = (usize, Case)> {
        cases()
            .into_iter()
            .enumerate()
            .filter(move |(_, c)| dtype.check_head_dim(c.head_dim).is_ok())
    }

    #[test]
    fn scalar_matches_an_f64_reference() {
        for dtype in KvDtype::ALL {
            for (i, case) in cases_for(dtype) {
                let case = &case;
                let (out, reference) = run_as(dtype, case, Level::Scalar, i as u64 + 7);
                for (a, b) in out.iter().zip(&reference) {
                    assert!(
                        (*a as f64 - b).abs() < 2e-5,
                        "{dtype}, case {i}: {a} vs {b} (hd {}, n {})",
                        case.head_dim,
                        case.n
                    );
                }
            }
        }
    }

    #[test]
    fn every_level_gives_the_scalar_bits() {
        for dtype in KvDtype::ALL {
            for level in Level::supported() {
                for (i, case) in cases_for(dtype) {
                    let case = &case;
                    let (want, _) = run_as(dtype, case, Level::Scalar, i as u64 + 7);
                    let (got, _) = run_as(dtype, case, level, i as u64 + 7);
                    let same = same_bits(&got, &want);
                    assert!(same, "{dtype} at {level}, case {i}: {got:?} vs {want:?}");
                }
            }
        }
    }

    #[test]
    fn dtypes_parse_and_round_values_to_nearest() {
        for dtype in KvDtype::ALL {
            assert_eq!(dtype.to_string().parse::<KvDtype>(), Ok(dtype));
        }
        assert_eq!("FP16".parse::<KvDtype>(), Ok(KvDtype::F16));
        assert!("q4_0"
            .parse::<KvDtype>()
            .unwrap_err()
            .contains("f16, bf16, f32 or q8_0"));
        assert!(KvDtype::Q8_0.check_head_dim(80).is_err());
        assert_eq!(KvDtype::Q8_0.bytes(64), 68);
        assert_eq!(KvDtype::default(), KvDtype::F16);
        // 1 + 2^-11 is halfway between two f16 values: ties to even.
        let x = 1.0 + 2f32.powi(-11);
        assert_eq!(f16::from_f32(x).to_f32(), 1.0);
        assert_eq!(bf16::from_f32(3.0).to_f32(), 3.0);
        // Q8_0: the largest magnitude is ±127 steps, the rest rounded to the nearest step.
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let (_, held) = stored::<Q8Block>(&x);
        let step = f16::from_f32(16.0 / 127.0).to_f32();
        for (a, b) in x.iter().zip(&held) {
            assert!((a - b).abs() <= step / 2.0 + 1e-6, "{a} {b}");
        }
    }

    /// Scores to probabilities in place (`exp(s - max) / Σ`) at `level`: the decode kernel's
    /// softmax alone.
    fn softmax(level: Level, s: &mut [f32]) {
        match level.capped() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `capped` only yields levels the CPU runs; the pointer covers `s`.
            Level::Avx512 => unsafe {
                crate::x86::attention::softmax_avx512(s.as_mut_ptr(), s.len());
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx2 => unsafe {
                crate::x86::attention::softmax_avx2(s.as_mut_ptr(), s.len());
            },
            _ => {
                scalar_softmax(s);
            }
        }
    }

    #[test]
    fn softmax_levels_agree_on_odd_lengths() {
        let mut rng = Rng(3);
        let mut r = || rng.next();
        for n in [1, 7, 8, 15, 16, 17, 33, 200] {
            let mut x: Vec<f32> = (0..n).map(|_| r() * 30.0).collect();
            if n > 1 {
                // A masked-out score weighs exactly nothing.
                x[n / 2] = f32::NEG_INFINITY;
            }
            let mut want = x.clone();
            softmax(Level::Scalar, &mut want);
            assert!((want.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            if n > 1 {
                assert_eq!(want[n / 2], 0.0);
            }
            for level in Level::supported() {
                let mut got = x.clone();
                softmax(level, &mut got);
                let same = same_bits(&got, &want);
                assert!(same, "{level}, n {n}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "past the block table")]
    fn a_window_past_the_block_table_panics() {
        let (k, v) = (vec![0f32; 8], vec![0f32; 8]);
        let kv = PagedKv {
            k: &k,
            v: &v,
            kv_heads: 1,
            block_size: 2,
        };
        let q = [1f32, 1.0];
        let heads = HeadGroup {
            q: &q,
            head_dim: 2,
            kv_head: 0,
            scale: 1.0,
        };
        let mut out = [0f32; 2];
        attend(
            Level::Scalar,
            &heads,
            &kv,
            &[0],
            0..3,
            &mut AttendScratch::default(),
            &mut out,
        );
    }
}
