//! Prefill attention: the tokens of one sequence's chunk attend over their causal windows of
//! the paged KV cache, read in place through the block table (no gathered copy of the window,
//! no score matrix): a flash-style online softmax.
//!
//! Tokens are taken [`TILE`] at a time, one lane each, with the query heads that share a KV
//! head; positions in groups of [`KEYS`] (the runs of a block starting at multiples of
//! [`KEYS`], so the groups follow from the positions alone). Each group's K and V rows are
//! widened to f32 once for every head and token of the tile. Lanes are independent: a token's
//! result depends on its own query and window only, never on the tile or the chunk it came in
//! (a group outside its window leaves its state exactly as it was). Every level performs the
//! same float operations in the same order per lane, so all give the scalar twin's bits:
//! - `q` is pre-scaled (`q·scale`, one rounding); a score is `Σ_d k_d · q_d`, fused
//!   multiply-adds in `d` order from 0; a position outside the token's window scores -inf;
//! - per group, with the running max `m`, sum `l` and output `o`: `m' = max(m, s_0, …,
//!   s_15)`, `c = exp(m − m')`, `p_j = exp(s_j − m')` ([`crate::attention`]'s `exp`, 0 for
//!   -inf and NaN), `l' = l·c + p_0 + … + p_15` in order, and each output element
//!   `o'_d = o_d·c` followed by `fma(v_jd, p_j, ·)` for `j` in order;
//! - at the end `out_d = o_d · (1 / l)`.

use std::ops::Range;

use crate::attention::{exp, KvElement, PagedKv};
use crate::Level;

/// Query tokens per tile: one per lane of an AVX-512 vector.
pub const TILE: usize = 16;
/// Positions per group.
pub(crate) const KEYS: usize = 16;

/// The tokens of a chunk and the query heads that share one KV head.
#[derive(Debug, Clone, Copy)]
pub struct ChunkQueries<'a> {
    /// `[tokens, stride]`: each token's query heads, `head_dim` floats each; the group that
    /// shares `kv_head` starts at column `kv_head · group · head_dim`.
    pub q: &'a [f32],
    pub stride: usize,
    pub tokens: usize,
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
    pub kv_head: usize,
    /// Scores are `scale · q·k`.
    pub scale: f32,
    /// The first token's position: token `t` is at `first + t` and sees positions
    /// `(p + 1).saturating_sub(window) ..= p`.
    pub first: usize,
    pub window: usize,
}

/// Buffers one thread reuses across calls of [`attend_chunk`].
#[derive(Debug, Clone, Default)]
pub struct ChunkScratch {
    /// Per head: `q` transposed, `[head_dim][TILE]`, pre-scaled.
    qt: Vec<f32>,
    /// Per head: the running output, `[head_dim][TILE]`.
    o: Vec<f32>,
    /// Per head: running max and sum per lane.
    m: Vec<[f32; TILE]>,
    l: Vec<[f32; TILE]>,
    /// One group's K and V rows as f32, `[KEYS][head_dim]`, zero where not read.
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Which (position, lane) pairs of a group count: position `first + j` for `j < n`, where
/// `lo[lane] ≤ first + j ≤ hi[lane]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mask {
    pub first: i32,
    pub n: usize,
    pub lo: [i32; TILE],
    pub hi: [i32; TILE],
}

impl Mask {
    #[inline(always)]
    pub fn valid(&self, j: usize, lane: usize) -> bool {
        let p = self.first + j as i32;
        j < self.n && self.lo[lane] <= p && p <= self.hi[lane]
    }
}

/// One head's state over a tile, lanes being tokens.
pub(crate) struct Lanes<'a> {
    /// `[head_dim][TILE]`.
    pub qt: &'a [f32],
    /// `[head_dim][TILE]`.
    pub o: &'a mut [f32],
    pub m: &'a mut [f32; TILE],
    pub l: &'a mut [f32; TILE],
}

/// One group of positions: K and V rows `[KEYS][head_dim]` (zero rows where not read), and
/// the mask where some lane does not see all of them.
pub(crate) struct Group<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub head_dim: usize,
    pub mask: Option<&'a Mask>,
}

/// Attention of `queries`' tokens (the heads that share `queries.kv_head`) over their windows
/// of the sequence whose blocks are `block_table`, at `level` (lowered to what the CPU has),
/// into `out`: `[tokens, group · head_dim]`, each token's heads one after the other.
///
/// # Panics
/// If a shape disagrees, the window is 0, or a position falls outside the block table or
/// the cache.
pub fn attend_chunk<T: KvElement>(
    level: Level,
    queries: &ChunkQueries<'_>,
    kv: &PagedKv<'_, T>,
    block_table: &[u32],
    scratch: &mut ChunkScratch,
    out: &mut [f32],
) {
    let ChunkQueries {
        stride,
        tokens,
        head_dim: hd,
        group,
        kv_head,
        ..
    } = *queries;
    let cols = kv_head * group * hd..(kv_head + 1) * group * hd;
    assert!(
        hd > 0 && group > 0 && queries.window > 0,
        "empty heads or window"
    );
    assert!(
        hd.is_multiple_of(T::VALUES),
        "rows of {hd} values in a {} cache",
        T::DTYPE
    );
    assert!(cols.end <= stride, "heads past the query row");
    assert!(
        queries.q.len() >= tokens * stride && out.len() == tokens * group * hd,
        "query or output not {tokens} rows"
    );
    assert!(
        kv_head < kv.kv_heads && kv.block_size > 0 && kv.k.len() == kv.v.len(),
        "KV head {kv_head} of {}, blocks of {}",
        kv.kv_heads,
        kv.block_size
    );
    let last = queries.first + tokens;
    assert!(
        last <= i32::MAX as usize && last <= block_table.len() * kv.block_size,
        "positions up to {last} are past the block table"
    );
    let level = level.capped();
    let mut first = 0;
    while first < tokens {
        let n = TILE.min(tokens - first);
        attend_tile(
            level,
            queries,
            first..first + n,
            kv,
            block_table,
            scratch,
            out,
        );
        first += n;
    }
}

/// [`attend_chunk`] for tokens `rows` (at most [`TILE`]).
fn attend_tile<T: KvElement>(
    level: Level,
    queries: &ChunkQueries<'_>,
    rows: Range<usize>,
    kv: &PagedKv<'_, T>,
    block_table: &[u32],
    scratch: &mut ChunkScratch,
    out: &mut [f32],
) {
    let ChunkQueries {
        q,
        stride,
        head_dim: hd,
        group,
        kv_head,
        scale,
        window,
        ..
    } = *queries;
    let nt = rows.len();
    let col0 = kv_head * group * hd;
    let ChunkScratch { qt, o, m, l, k, v } = scratch;
    qt.clear();
    qt.resize(group * hd * TILE, 0.0);
    for (lane, t) in rows.clone().enumerate() {
        let row = &q[t * stride + col0..][..group * hd];
        for (h, head) in row.chunks_exact(hd).enumerate() {
            for (d, &x) in head.iter().enumerate() {
                qt[(h * hd + d) * TILE + lane] = x * scale;
            }
        }
    }
    o.clear();
    o.resize(group * hd * TILE, 0.0);
    m.clear();
    m.resize(group, [f32::NEG_INFINITY; TILE]);
    l.clear();
    l.resize(group, [0.0; TILE]);
    k.resize(KEYS * hd, 0.0);
    v.resize(KEYS * hd, 0.0);

    // Lane bounds; lanes past the tile's tokens repeat its last token (their results are
    // dropped).
    let pos = |lane: usize| queries.first + rows.start + lane.min(nt - 1);
    let mut mask = Mask {
        first: 0,
        n: 0,
        lo: std::array::from_fn(|lane| (pos(lane) + 1).saturating_sub(window) as i32),
        hi: std::array::from_fn(|lane| pos(lane) as i32),
    };
    let (lo_min, lo_max) = (mask.lo[0] as usize, mask.lo[TILE - 1] as usize);
    let (hi_min, hi_max) = (mask.hi[0] as usize, mask.hi[TILE - 1] as usize);

    let (bs, units) = (kv.block_size, hd / T::VALUES);
    let mut p = lo_min - (lo_min % bs) % KEYS;
    while p <= hi_max {
        let (block, at) = (block_table[p / bs] as usize, p % bs);
        let n = KEYS.min(bs - at);
        // Rows outside every lane's window stay zero: they are never seen, and a slot past the
        // sequence's end holds whatever was there.
        let read = p.max(lo_min)..(p + n).min(hi_max + 1);
        let start = kv.at(block, kv_head, at + (read.start - p), units);
        let src = start..start + read.len() * units;
        let dst = (read.start - p) * hd..(read.end - p) * hd;
        for rows in [&mut k[..], &mut v[..]] {
            rows[..dst.start].fill(0.0);
            rows[dst.end..].fill(0.0);
        }
        T::to_f32_slice(&mut k[dst.clone()], &kv.k[src.clone()]);
        T::to_f32_slice(&mut v[dst], &kv.v[src]);
        let masked = n < KEYS || p < lo_max || p + KEYS - 1 > hi_min;
        mask.first = p as i32;
        mask.n = n;
        let g = Group {
            k,
            v,
            head_dim: hd,
            mask: masked.then_some(&mask),
        };
        for h in 0..group {
            let mut lanes = Lanes {
                qt: &qt[h * hd * TILE..][..hd * TILE],
                o: &mut o[h * hd * TILE..][..hd * TILE],
                m: &mut m[h],
                l: &mut l[h],
            };
            group_update(level, &mut lanes, &g);
        }
        p += n;
    }

    for (lane, t) in rows.enumerate() {
        for h in 0..group {
            let inv = 1.0 / l[h][lane];
            let dst = &mut out[(t * group + h) * hd..][..hd];
            for (d, x) in dst.iter_mut().enumerate() {
                *x = o[(h * hd + d) * TILE + lane] * inv;
            }
        }
    }
}

/// One group's update of one head's lanes at `level` (already capped).
fn group_update(level: Level, lanes: &mut Lanes<'_>, g: &Group<'_>) {
    debug_assert!(lanes.qt.len() == g.head_dim * TILE && g.k.len() == KEYS * g.head_dim);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was capped to what the CPU runs; the shapes were checked above.
        Level::Avx512 => unsafe { crate::x86::prefill::group_avx512(lanes, g) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::prefill::group_avx2(lanes, g) },
        _ => group_scalar(lanes, g),
    }
}

/// The portable twin every SIMD level is tested against.
pub(crate) fn group_scalar(lanes: &mut Lanes<'_>, g: &Group<'_>) {
    let hd = g.head_dim;
    for lane in 0..TILE {
        let mut s = [0f32; KEYS];
        for (j, s) in s.iter_mut().enumerate() {
            for d in 0..hd {
                *s = g.k[j * hd + d].mul_add(lanes.qt[d * TILE + lane], *s);
            }
            if g.mask.is_some_and(|mask| !mask.valid(j, lane)) {
                *s = f32::NEG_INFINITY;
            }
        }
        let m_old = lanes.m[lane];
        let m = s.iter().fold(m_old, |m, &x| max(m, x));
        let c = exp(m_old - m);
        let mut l = lanes.l[lane] * c;
        for s in s.iter_mut() {
            *s = exp(*s - m);
            l += *s;
        }
        lanes.m[lane] = m;
        lanes.l[lane] = l;
        for d in 0..hd {
            let o = &mut lanes.o[d * TILE + lane];
            let mut acc = *o * c;
            for (j, &p) in s.iter().enumerate() {
                acc = g.v[j * hd + d].mul_add(p, acc);
            }
            *o = acc;
        }
    }
}

/// `max` as `vmaxps` computes it: `b` unless `a > b`.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::stored;
    use crate::attention::Q8Block;
    use crate::tests::{same_bits, Rng};
    use half::{bf16, f16};

    struct Case {
        group: usize,
        head_dim: usize,
        /// Positions before the chunk.
        cached: usize,
        tokens: usize,
        block_size: usize,
        window: usize,
    }

    /// Runs `case` over a `T` cache (KV head 1 of 2, a shuffled block table) at `level`;
    /// returns the output and an f64 reference over the values the cache holds.
    fn run<T: KvElement>(case: &Case, level: Level, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let Case {
            group,
            head_dim: hd,
            cached,
            tokens,
            block_size: bs,
            window,
        } = *case;
        let mut rng = Rng(seed | 1);
        let context = cached + tokens;
        let blocks = context.div_ceil(bs) + 2;
        let mut table: Vec<u32> = (0..blocks as u32).rev().collect();
        table.rotate_left(1);
        let kv_heads = 2;
        let len = blocks * kv_heads * bs * hd;
        // Every slot holds something, so a read past the window would show.
        let k: Vec<f32> = (0..len).map(|_| rng.next() * 2.0).collect();
        let v: Vec<f32> = (0..len).map(|_| rng.next()).collect();
        let (k, k_held) = stored::<T>(&k);
        let (v, v_held) = stored::<T>(&v);
        let kv = PagedKv {
            k: &k,
            v: &v,
            kv_heads,
            block_size: bs,
        };
        let stride = kv_heads * group * hd + 3;
        let q: Vec<f32> = (0..tokens * stride).map(|_| rng.next()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let queries = ChunkQueries {
            q: &q,
            stride,
            tokens,
            head_dim: hd,
            group,
            kv_head: 1,
            scale,
            first: cached,
            window,
        };
        let mut out = vec![f32::NAN; tokens * group * hd];
        let mut scratch = ChunkScratch::default();
        attend_chunk(level, &queries, &kv, &table, &mut scratch, &mut out);
        let cols = group * hd..2 * group * hd;
        let mut want = Vec::new();
        for t in 0..tokens {
            let p = cached + t;
            let keys: Vec<usize> = ((p + 1).saturating_sub(window)..=p).collect();
            for h in 0..group {
                let qh = &q[t * stride + cols.start + h * hd..][..hd];
                let at = |j: usize| kv.at(table[j / bs] as usize, 1, j % bs, 1) * hd;
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let kr = &k_held[at(j)..at(j) + hd];
                        qh.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let o: f64 = keys
                        .iter()
                        .zip(&e)
                        .map(|(&j, p)| p * v_held[at(j) + d] as f64)
                        .sum();
                    want.push(o / sum);
                }
            }
        }
        (out, want)
    }

    fn cases() -> Vec<Case> {
        let case = |group, head_dim, cached, tokens, block_size, window| Case {
            group,
            head_dim,
            cached,
            tokens,
            block_size,
            window,
        };
        vec![
            case(1, 64, 0, 16, 16, usize::MAX),
            case(4, 64, 0, 37, 16, usize::MAX),
            case(3, 64, 100, 21, 16, usize::MAX),
            case(2, 80, 33, 50, 64, usize::MAX),
            case(1, 8, 5, 19, 2, usize::MAX),
            case(2, 24, 7, 40, 5, 9),
            case(4, 64, 200, 35, 16, 48),
            case(1, 128, 0, 3, 256, 1),
            case(2, 17, 300, 17, 32, 100),
        ]
    }

    fn check<T: KvElement>(tol: f64) {
        let cases = cases().into_iter().enumerate();
        for (i, case) in cases.filter(|(_, c)| T::DTYPE.check_head_dim(c.head_dim).is_ok()) {
            let case = &case;
            let (scalar, want) = run::<T>(case, Level::Scalar, 7 + i as u64);
            let worst = scalar
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0f64, f64::max);
            assert!(worst < tol, "case {i}: off by {worst}");
            for level in Level::supported() {
                let (got, _) = run::<T>(case, level, 7 + i as u64);
                assert!(same_bits(&got, &scalar), "case {i} at {level}");
            }
        }
    }

    #[test]
    fn every_level_matches_the_reference_and_the_scalar_bits_in_every_dtype() {
        check::<f32>(2e-5);
        check::<f16>(2e-5);
        check::<bf16>(2e-5);
        check::<Q8Block>(2e-5);
    }

    #[test]
    fn a_token_gets_the_same_bits_in_any_chunk() {
        // The same 40 positions, attended as one chunk and as chunks of 7 and 33 tokens.
        let mut rng = Rng(99);
        let (hd, bs, group) = (32, 16, 2);
        let table: Vec<u32> = vec![2, 0, 1, 3];
        let k: Vec<f32> = (0..4 * bs * hd).map(|_| rng.next()).collect();
        let v: Vec<f32> = (0..4 * bs * hd).map(|_| rng.next()).collect();
        let kv = PagedKv {
            k: &k,
            v: &v,
            kv_heads: 1,
            block_size: bs,
        };
        let stride = group * hd;
        let q: Vec<f32> = (0..40 * stride).map(|_| rng.next()).collect();
        let queries = |rows: Range<usize>| ChunkQueries {
            q: &q[rows.start * stride..rows.end * stride],
            stride,
            tokens: rows.len(),
            head_dim: hd,
            group,
            kv_head: 0,
            scale: 0.3,
            first: rows.start,
            window: 20,
        };
        for level in Level::supported() {
            let mut scratch = ChunkScratch::default();
            let mut whole = vec![0f32; 40 * stride];
            attend_chunk(
                level,
                &queries(0..40),
                &kv,
                &table,
                &mut scratch,
                &mut whole,
            );
            let mut parts = vec![0f32; 40 * stride];
            let (a, b) = parts.split_at_mut(7 * stride);
            attend_chunk(level, &queries(0..7), &kv, &table, &mut scratch, a);
            attend_chunk(level, &queries(7..40), &kv, &table, &mut scratch, b);
            assert!(same_bits(&whole, &parts), "{level}");
        }
    }
}
