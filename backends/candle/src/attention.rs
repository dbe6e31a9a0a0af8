//! CPU paged attention over the [`KvCache`](crate::kv_cache::KvCache) layout
//! `[num_blocks, kv_heads, block_size, head_dim]`, f16, bf16, f32 or q8_0 (widened to f32 as read).
//!
//! A step first writes every token's K/V at its slot, then each query token attends over its own
//! sequence's positions `max(0, p + 1 - window) ..= p`, read through the sequence's block table.
//! Nothing is concatenated into the cache: the cost of a step is linear in the context it reads.
//!
//! Two kernels, both reading the cache in place: generated tokens go through wick's decode
//! attention kernel ([`wick_kernels::attend`], one call per (token, kv head)); prompt tokens,
//! however few, through its chunk kernel ([`wick_kernels::attend_chunk`], 16 tokens per tile,
//! so each K/V row read serves 16 tokens of every head of its group). The two do not give the
//! same bits, so which one computes a position must not depend on the step: a prompt whose
//! prefix was cached, or that was split into chunks, gets the same results as in one piece.

use candle_core::{bail, Result};
use rayon::prelude::*;
use wick_kernels::{
    AttendScratch, ChunkQueries, ChunkScratch, HeadGroup, KvElement, KvLayout, Level, PagedKv,
    CHUNK_TILE,
};

use crate::step::{SeqSpan, StepInput};

/// Head geometry and masking of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Slots per KV block.
    pub block_size: usize,
    /// Each query attends to at most this many positions (itself included).
    pub sliding_window: Option<usize>,
    /// Softmax scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// The CPU level the decode kernel runs at.
    pub level: Level,
}

impl AttentionParams {
    /// Floats in one token's K (or V) row: `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Floats in one token's query (and attention output) row: `num_heads * head_dim`.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// Checks, once per step, that the packed step is consistent and stays inside a cache of
/// `num_blocks` blocks: the sequences tile `0..total_tokens` in order, and every token's position
/// is inside its sequence's context and covered by its block table (its slot follows from it).
pub fn validate_step(
    positions: &[u32],
    seqs: &[SeqSpan<'_>],
    num_blocks: usize,
    block_size: usize,
) -> Result<()> {
    let total = positions.len();
    if block_size == 0 {
        bail!("block size is 0");
    }
    let mut next_start = 0;
    for (i, seq) in seqs.iter().enumerate() {
        if seq.start != next_start {
            bail!(
                "sequence {i} starts at token {} but the previous one ends at {next_start}",
                seq.start
            );
        }
        next_start = seq.start + seq.len;
        if next_start > total {
            bail!("sequence {i} ends at token {next_start}, past the step's {total} tokens");
        }
        if seq.len > seq.context_len {
            bail!(
                "sequence {i} computes {} tokens but its context is only {}",
                seq.len,
                seq.context_len
            );
        }
        if seq.context_len > seq.block_table.len() * block_size {
            bail!(
                "sequence {i} has context {} but only {} blocks of {block_size}",
                seq.context_len,
                seq.block_table.len()
            );
        }
        if let Some(&b) = seq.block_table.iter().find(|&&b| b as usize >= num_blocks) {
            bail!("sequence {i} uses block {b}, the cache has {num_blocks}");
        }
        // A step computes the last `len` positions of the sequence's context, in order.
        for (j, &p) in positions[seq.start..next_start].iter().enumerate() {
            let (t, p) = (seq.start + j, p as usize);
            let expected = seq.context_len - seq.len + j;
            if p != expected {
                bail!(
                    "token {t} of sequence {i} is at position {p}, expected {expected} (the last {} \
                     of its context {})",
                    seq.len,
                    seq.context_len
                );
            }
        }
    }
    if next_start != total {
        bail!("sequences cover {next_start} of the step's {total} tokens");
    }
    Ok(())
}

/// Writes each token's K and V rows (`[tokens, kv_width]`) of a checked `step` (see
/// [`validate_step`]) at the slot its sequence's block table gives its position, in one layer's
/// cache (rounded to the cache's type).
pub fn write_kv<T: KvElement>(
    cache_k: &mut [T],
    cache_v: &mut [T],
    k: &[f32],
    v: &[f32],
    step: &StepInput<'_>,
    params: &AttentionParams,
) -> Result<()> {
    let (kv_width, block_size, hd) = (params.kv_width(), params.block_size, params.head_dim);
    let tokens = step.positions.len();
    if k.len() != tokens * kv_width || v.len() != k.len() || cache_k.len() != cache_v.len() {
        bail!(
            "write_kv: {} K and {} V floats for {tokens} tokens of width {kv_width}",
            k.len(),
            v.len(),
        );
    }
    if !hd.is_multiple_of(T::VALUES) {
        bail!("write_kv: rows of {hd} values in a {} cache", T::DTYPE);
    }
    // The cache's elements per row: values, or Q8_0 blocks of 32.
    let units = hd / T::VALUES;
    let layout = KvLayout {
        kv_heads: params.num_kv_heads,
        block_size,
        row_len: units,
    };
    for seq in &step.seqs {
        for t in seq.start..seq.start + seq.len {
            let (block, i) = seq.kv_place(step.positions[t] as usize, block_size);
            if layout.at(block, params.num_kv_heads - 1, i + 1) > cache_k.len() {
                bail!("token {t}'s slot is outside the KV cache");
            }
            for g in 0..params.num_kv_heads {
                let at = layout.at(block, g, i);
                let row = t * kv_width + g * hd..t * kv_width + (g + 1) * hd;
                T::from_f32_slice(&mut cache_k[at..at + units], &k[row.clone()]);
                T::from_f32_slice(&mut cache_v[at..at + units], &v[row]);
            }
        }
    }
    Ok(())
}

/// Splits the stacked q/k/v projection `qkv` (`[tokens, q_width + 2 · kv_width]`, each token's
/// q, k and v one after the other) into `q`, `k` and `v`, rotating q and k by rope on the way:
/// `cos` and `sin` are `[tokens, head_dim / 2]`, each head's halves rotated as candle's
/// `rope_thd` does (`x₁·cos − x₂·sin`, `x₁·sin + x₂·cos`, the same float operations, so the
/// same bits). One pass over the tokens, in parallel, where separate copies and rope calls
/// cost a step several small passes per layer.
pub fn split_rope(
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    params: &AttentionParams,
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    let (hd, q_width, kv_width) = (params.head_dim, params.q_width(), params.kv_width());
    let width = q_width + 2 * kv_width;
    let half = hd / 2;
    let tokens = q.len() / q_width.max(1);
    if hd % 2 != 0
        || qkv.len() != tokens * width
        || q.len() != tokens * q_width
        || k.len() != tokens * kv_width
        || v.len() != k.len()
        || cos.len() != tokens * half
        || sin.len() != cos.len()
    {
        bail!(
            "split_rope: {} q/k/v floats, {} cos and {} sin for {tokens} tokens of {q_width} + \
             2 x {kv_width} (head_dim {hd})",
            qkv.len(),
            cos.len(),
            sin.len()
        );
    }
    let rotate = |src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32]| {
        for (src, dst) in src.chunks_exact(hd).zip(dst.chunks_exact_mut(hd)) {
            let (x1, x2) = src.split_at(half);
            let (y1, y2) = dst.split_at_mut(half);
            for i in 0..half {
                y1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                y2[i] = x1[i] * sin[i] + x2[i] * cos[i];
            }
        }
    };
    qkv.par_chunks(width)
        .zip(q.par_chunks_mut(q_width))
        .zip(k.par_chunks_mut(kv_width))
        .zip(v.par_chunks_mut(kv_width))
        .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
        .with_min_len(8)
        .for_each(|((((row, q), k), v), (cos, sin))| {
            let (q_in, rest) = row.split_at(q_width);
            let (k_in, v_in) = rest.split_at(kv_width);
            rotate(q_in, q, cos, sin);
            rotate(k_in, k, cos, sin);
            v.copy_from_slice(v_in);
        });
    Ok(())
}

/// Attention of every packed query token over its own sequence's cached K/V.
///
/// `q` is `[tokens, num_heads * head_dim]`, `out` the same shape; the step's K/V must already be
/// written (see [`write_kv`]) and the step checked with [`validate_step`]. Sequences with
/// prompt tokens run through the chunk kernel (see [`SeqSpan::prompt`]); generated tokens are
/// split over (token, kv head) pairs; either way the query heads that share a kv head read each K/V
/// row once.
pub fn paged_attention<T: KvElement>(
    q: &[f32],
    cache_k: &[T],
    cache_v: &[T],
    positions: &[u32],
    seqs: &[SeqSpan<'_>],
    params: &AttentionParams,
    out: &mut [f32],
) -> Result<()> {
    let hd = params.head_dim;
    let q_width = params.q_width();
    if params.num_kv_heads == 0 || !params.num_heads.is_multiple_of(params.num_kv_heads) {
        bail!(
            "{} heads cannot share {} kv heads",
            params.num_heads,
            params.num_kv_heads
        );
    }
    let group = params.num_heads / params.num_kv_heads;
    if q.len() != positions.len() * q_width || out.len() != q.len() {
        bail!(
            "paged_attention: {} query and {} output floats for {} tokens of width {q_width}",
            q.len(),
            out.len(),
            positions.len()
        );
    }
    let window = params.sliding_window.unwrap_or(usize::MAX).max(1);
    let job = Job {
        q,
        cache_k,
        cache_v,
        positions,
        seqs,
        params,
        group,
        window,
    };
    chunk_attention(&job, out);

    out.par_chunks_mut(group * hd)
        .enumerate()
        .for_each_init(AttendScratch::default, |scratch, (item, out)| {
            attend(&job, item, scratch, out)
        });
    Ok(())
}

/// What every (token, kv head) work item of one [`paged_attention`] call reads.
struct Job<'a, 's, T> {
    q: &'a [f32],
    cache_k: &'a [T],
    cache_v: &'a [T],
    positions: &'a [u32],
    seqs: &'a [SeqSpan<'s>],
    params: &'a AttentionParams,
    /// Query heads per kv head.
    group: usize,
    window: usize,
}

/// Every prefill chunk of the step (the sequences computing prompt tokens) through
/// wick's chunk kernel, reading the cache in place: one work item per (tile of
/// [`CHUNK_TILE`] tokens, kv head), all of them in parallel, each into its own rows of
/// results that are then copied to the tokens' columns of `out`.
fn chunk_attention<T: KvElement>(job: &Job<'_, '_, T>, out: &mut [f32]) {
    let params = job.params;
    let (hd, group, q_width) = (params.head_dim, job.group, params.q_width());
    let kv = PagedKv {
        k: job.cache_k,
        v: job.cache_v,
        kv_heads: params.num_kv_heads,
        block_size: params.block_size,
    };
    // (sequence, first token of the tile within it, tokens, kv head)
    let mut items = Vec::new();
    for seq in job.seqs.iter().filter(|s| s.prompt) {
        for t in (0..seq.len).step_by(CHUNK_TILE) {
            let n = CHUNK_TILE.min(seq.len - t);
            items.extend((0..params.num_kv_heads).map(|g| (seq, t, n, g)));
        }
    }
    if items.is_empty() {
        return;
    }
    let item_len = CHUNK_TILE * group * hd;
    let mut results = vec![0f32; items.len() * item_len];
    results
        .par_chunks_mut(item_len)
        .zip(items.par_iter())
        .for_each_init(ChunkScratch::default, |scratch, (res, &(seq, t, n, g))| {
            let first_token = seq.start + t;
            let queries = ChunkQueries {
                q: &job.q[first_token * q_width..(first_token + n) * q_width],
                stride: q_width,
                tokens: n,
                head_dim: hd,
                group,
                kv_head: g,
                scale: params.scale,
                first: seq.context_len - seq.len + t,
                window: job.window,
            };
            let res = &mut res[..n * group * hd];
            wick_kernels::attend_chunk(params.level, &queries, &kv, seq.block_table, scratch, res);
        });
    for (res, &(seq, t, n, g)) in results.chunks_exact(item_len).zip(&items) {
        for (i, heads) in res[..n * group * hd].chunks_exact(group * hd).enumerate() {
            let row = (seq.start + t + i) * q_width + g * group * hd;
            out[row..row + group * hd].copy_from_slice(heads);
        }
    }
}

/// One work item: the `group` query heads of token `item / kv_heads` that share kv head
/// `item % kv_heads`, over the token's window of its own sequence.
fn attend<T: KvElement>(
    job: &Job<'_, '_, T>,
    item: usize,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let params = job.params;
    let (hd, group) = (params.head_dim, job.group);
    let t = item / params.num_kv_heads;
    let g = item % params.num_kv_heads;
    // Sequences tile the tokens in order (validate_step), so this finds t's sequence.
    let s = job.seqs.partition_point(|s| s.start + s.len <= t);
    let Some(seq) = job.seqs.get(s) else {
        out.fill(0.0);
        return;
    };
    if seq.prompt {
        return; // chunk_attention wrote it.
    }
    let p = job.positions[t] as usize;
    let heads = HeadGroup {
        q: &job.q[t * params.q_width() + g * group * hd..][..group * hd],
        head_dim: hd,
        kv_head: g,
        scale: params.scale,
    };
    let kv = PagedKv {
        k: job.cache_k,
        v: job.cache_v,
        kv_heads: params.num_kv_heads,
        block_size: params.block_size,
    };
    let window = (p + 1).saturating_sub(job.window)..p + 1;
    wick_kernels::attend(
        params.level,
        &heads,
        &kv,
        seq.block_table,
        window,
        scratch,
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step of `positions` over one sequence.
    fn step<'a>(positions: &[u32], seq: SeqSpan<'a>) -> StepInput<'a> {
        StepInput {
            tokens: vec![0; positions.len()],
            positions: positions.to_vec(),
            seqs: vec![seq],
            logit_rows: Vec::new(),
        }
    }

    fn params(window: Option<usize>) -> AttentionParams {
        AttentionParams {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 3,
            block_size: 2,
            sliding_window: window,
            scale: 1.0,
            level: Level::detected(),
        }
    }

    #[test]
    fn split_rope_gives_candles_rope_bits() {
        use candle_core::{Device, Tensor};
        let (tokens, heads, kv_heads, hd) = (5, 6, 2, 8);
        let p = AttentionParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            ..params(None)
        };
        let width = (heads + 2 * kv_heads) * hd;
        let value = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 97.0;
        let qkv: Vec<f32> = (0..tokens * width).map(value).collect();
        let cos: Vec<f32> = (0..tokens * hd / 2)
            .map(|i| (i as f32 * 0.37).cos())
            .collect();
        let sin: Vec<f32> = (0..tokens * hd / 2)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut q = vec![0f32; tokens * heads * hd];
        let mut k = vec![0f32; tokens * kv_heads * hd];
        let mut v = vec![0f32; k.len()];
        split_rope(&qkv, &cos, &sin, &p, &mut q, &mut k, &mut v).unwrap();

        let dev = &Device::Cpu;
        let all = Tensor::from_vec(qkv, (tokens, width), dev).unwrap();
        let cos = Tensor::from_vec(cos, (tokens, hd / 2), dev).unwrap();
        let sin = Tensor::from_vec(sin, (tokens, hd / 2), dev).unwrap();
        let part = |start: usize, n: usize| {
            all.narrow(1, start * hd, n * hd)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((1, tokens, n, hd))
                .unwrap()
        };
        let rope = |x: Tensor| {
            candle_nn::rotary_emb::rope_thd(&x, &cos, &sin)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&q), bits(&rope(part(0, heads))));
        assert_eq!(bits(&k), bits(&rope(part(heads, kv_heads))));
        let v_want = part(heads + kv_heads, kv_heads).flatten_all().unwrap();
        assert_eq!(v, v_want.to_vec1::<f32>().unwrap());
        // A shape that does not add up is an error, not a panic.
        assert!(split_rope(&v, &[], &[], &p, &mut q, &mut k, &mut []).is_err());
    }

    #[test]
    fn single_key_returns_its_value_through_the_block_table() {
        // One token at position 0 whose only block is block 1 of 2.
        let p = params(None);
        let table = [1u32];
        let s = step(
            &[0],
            SeqSpan {
                start: 0,
                len: 1,
                context_len: 1,
                block_table: &table,
                prompt: true,
            },
        );
        validate_step(&s.positions, &s.seqs, 2, 2).unwrap();
        let mut ck = vec![0f32; 4 * 3];
        let mut cv = vec![0f32; 4 * 3];
        write_kv(&mut ck, &mut cv, &[1., 2., 3.], &[4., 5., 6.], &s, &p).unwrap();
        // Position 0 of block 1: slot 2.
        assert_eq!(&cv[6..9], &[4., 5., 6.]);
        let mut out = vec![0f32; 6];
        let q = [0.3, -1., 2., 5., 5., 5.];
        paged_attention(&q, &ck, &cv, &s.positions, &s.seqs, &p, &mut out).unwrap();
        assert_eq!(out, vec![4., 5., 6., 4., 5., 6.]);
    }

    #[test]
    fn window_of_one_sees_only_the_token_itself() {
        let p = params(Some(1));
        let table = [0u32, 1];
        let s = step(
            &[0, 1, 2],
            SeqSpan {
                start: 0,
                len: 3,
                context_len: 3,
                block_table: &table,
                prompt: true,
            },
        );
        validate_step(&s.positions, &s.seqs, 2, 2).unwrap();
        let mut ck = vec![0f32; 4 * 3];
        let mut cv = vec![0f32; 4 * 3];
        let k = [1., 0., 0., 0., 1., 0., 0., 0., 1.];
        let v = [1., 1., 1., 2., 2., 2., 3., 3., 3.];
        write_kv(&mut ck, &mut cv, &k, &v, &s, &p).unwrap();
        let q = [1f32; 18];
        let mut out = vec![0f32; 18];
        paged_attention(&q, &ck, &cv, &s.positions, &s.seqs, &p, &mut out).unwrap();
        for (t, row) in out.chunks_exact(6).enumerate() {
            assert!(row.iter().all(|&x| x == (t + 1) as f32), "{row:?}");
        }
    }

    #[test]
    fn steps_outside_their_blocks_or_sequences_are_rejected() {
        let table = [3u32];
        let seqs = [SeqSpan {
            start: 0,
            len: 1,
            context_len: 1,
            block_table: &table,
            prompt: false,
        }];
        assert!(validate_step(&[0], &seqs, 4, 2).is_ok());
        // A block outside the cache.
        let err = validate_step(&[0], &seqs, 3, 2).unwrap_err();
        assert!(err.to_string().contains("block 3"), "{err}");
        // Tokens not covered by any sequence.
        assert!(validate_step(&[0, 1], &seqs, 4, 2).is_err());
        // A position its sequence's context does not reach.
        assert!(validate_step(&[1], &seqs, 4, 2).is_err());
    }
}
