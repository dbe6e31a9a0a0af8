//! Weight matrices repacked at load for the kernels, and the threaded matmul over them.
//!
//! Layout: output features (the matrix's rows) are grouped in panels of [`PANEL`] = 16. A
//! panel holds, unit after unit along `k` (a unit is one stored block: 32 elements, or a K
//! format's super-block of 256 = 8 sub-blocks of 32), for each 32-element sub-block the quants
//! of its 16 features interleaved four bytes at a time (`[group 0..8][feature 0..16][4 bytes]`,
//! so one 64-byte load holds four consecutive quants of all 16 features), then the unit's
//! scales, feature after feature. 4-bit quants keep two groups per byte (group `g` in the low
//! nibbles, group `g + 4` in the high ones: Q4_0's stored bytes, re-interleaved; Q4_K's
//! sub-blocks are brought to the same order); Q6_K adds two planes of its high 2 bits (groups
//! 0..4 in the first, 4..8 in the second, group `g % 4` at bits `2·(g % 4)`); Q8_0 quants are
//! stored offset by 128 as `u8`, so every format feeds the `u8 × i8` dot-product instructions
//! and subtracts its offset once per block through the activation block sums. The last panel
//! is padded with zero scales.
//!
//! A panel of 16 features over k = 2048 is 9–17 KiB, so while a thread sweeps the activation
//! rows over it, the panel stays in L1/L2: each weight byte comes from memory once per step
//! whatever the number of rows.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::activation::{QuantizedRows, RowBlocks};
use crate::format::{self, Format, BLOCK};
use crate::level::Level;

/// Output features per panel.
pub const PANEL: usize = 16;

/// Activation rows one task sweeps over a panel before moving on.
const ROW_CHUNK: usize = 64;

/// Rows from which [`for_each_gated_tile`] applies SiLU·up to each task's panels (see there).
const GATED_MIN_ROWS: usize = 8;

/// 32-element sub-blocks per unit.
#[inline(always)]
pub(crate) const fn subs(format: Format) -> usize {
    format.block_elems() / BLOCK
}

/// How a format's block scales turn integer dots into floats.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `acc += f32(dot − offset·Σa) · (d·da)`: Q8_0, Q4_0, Q5_0.
    Offset,
    /// `acc += f32(dot) · (d·da); acc += m · (da·f32(Σa))`: Q4_1, Q5_1.
    Min,
    /// `acc += f32(dot) · ((d·f32(sc))·da); acc −= (dmin·f32(m)) · (da·f32(Σa))`: Q4_K, Q5_K.
    SubScaled,
    /// `acc += f32(sc₀·(dot₀ − 32·Σa₀) + sc₁·(dot₁ − 32·Σa₁)) · (d·da)` over the two halves
    /// of the block: Q6_K.
    Halves,
}

#[inline(always)]
pub(crate) const fn kind(format: Format) -> Kind {
    match format {
        Format::Q8_0 | Format::Q4_0 | Format::Q5_0 => Kind::Offset,
        Format::Q4_1 | Format::Q5_1 => Kind::Min,
        Format::Q4K | Format::Q5K => Kind::SubScaled,
        Format::Q6K => Kind::Halves,
    }
}

/// Bits of a quant above its low nibble, kept in planes after the nibbles (8-bit Q8_0: 0).
#[inline(always)]
pub(crate) const fn high_bits(format: Format) -> usize {
    match format {
        Format::Q5_0 | Format::Q5_1 | Format::Q5K => 1,
        Format::Q6K => 2,
        _ => 0,
    }
}

/// Bytes of the interleaved quants of one sub-block of a panel.
#[inline(always)]
pub(crate) const fn sub_bytes(format: Format) -> usize {
    match format {
        Format::Q8_0 => PANEL * BLOCK,
        _ => PANEL * BLOCK / 2 + PANEL * BLOCK * high_bits(format) / 8,
    }
}

/// Where a unit's 16 f16 scales `d` start (after its quants).
#[inline(always)]
pub(crate) const fn scales_at(format: Format) -> usize {
    subs(format) * sub_bytes(format)
}

/// Where a unit's 16 f16 minimums start: Q4_1/Q5_1's `m`, Q4_K/Q5_K's `dmin`.
#[inline(always)]
pub(crate) const fn mins_at(format: Format) -> usize {
    scales_at(format) + 2 * PANEL
}

/// Where the 16 integer scales of group `j` start: Q4_K/Q5_K's 6-bit `sc` of sub-block `j`
/// (`u8`), Q6_K's scale of elements `16j..16j + 16` (`i8`).
#[inline(always)]
pub(crate) const fn sub_scales_at(format: Format, j: usize) -> usize {
    match format {
        Format::Q6K => scales_at(format) + 2 * PANEL + PANEL * j,
        _ => scales_at(format) + 4 * PANEL + PANEL * j,
    }
}

/// Where Q4_K/Q5_K's 16 6-bit minimums `m` of sub-block `j` start.
#[inline(always)]
pub(crate) const fn sub_mins_at(format: Format, j: usize) -> usize {
    sub_scales_at(format, 8) + PANEL * j
}

/// Bytes of one panel unit.
#[inline(always)]
pub(crate) const fn stride(format: Format) -> usize {
    match kind(format) {
        Kind::Offset => scales_at(format) + 2 * PANEL,
        Kind::Min => mins_at(format) + 2 * PANEL,
        Kind::SubScaled => sub_mins_at(format, 8),
        Kind::Halves => sub_scales_at(format, 16),
    }
}

/// What the stored `u8` quants are offset by (subtracted through the block sums).
#[inline(always)]
pub(crate) const fn offset(format: Format) -> i32 {
    match format {
        Format::Q8_0 => 128,
        Format::Q4_0 => 8,
        Format::Q5_0 => 16,
        Format::Q6K => 32,
        _ => 0,
    }
}

/// Byte of quant `i` (0..32) of feature `c` in a sub-block: 8-bit groups, or 4-bit
/// groups two per byte.
const fn quant_byte(format: Format, c: usize, i: usize) -> usize {
    match format {
        Format::Q8_0 => (i / 4 * PANEL + c) * 4 + i % 4,
        _ => (i % 16 / 4 * PANEL + c) * 4 + i % 4,
    }
}

/// Byte and shift of the bits above the nibble of quant `i` of feature `c` in a sub-block:
/// one plane with group `g`'s fifth bits at bit `g`, or (Q6_K) two planes with group `g`'s
/// two bits at bits `2·(g % 4)` of plane `g / 4`.
const fn high_bits_place(format: Format, c: usize, i: usize) -> (usize, u32) {
    let g = i / 4;
    let (plane, shift) = match high_bits(format) {
        1 => (0, g),
        _ => (g / 4, 2 * (g % 4)),
    };
    (
        PANEL * BLOCK / 2 + (plane * PANEL + c) * 4 + i % 4,
        shift as u32,
    )
}

/// Quant `i` of sub-block `sub` of feature `c`, as the kernels see it (`u8`, offset included).
pub(crate) fn quant(format: Format, sub: &[u8], c: usize, i: usize) -> u8 {
    let byte = sub[quant_byte(format, c, i)];
    if format == Format::Q8_0 {
        return byte;
    }
    let q = if i < 16 { byte & 0x0f } else { byte >> 4 };
    let bits = high_bits(format);
    if bits == 0 {
        return q;
    }
    let (at, shift) = high_bits_place(format, c, i);
    q | (((sub[at] >> shift) & ((1 << bits) - 1)) << 4)
}

fn set_quant(format: Format, sub: &mut [u8], c: usize, i: usize, q: u8) {
    let at = quant_byte(format, c, i);
    if format == Format::Q8_0 {
        sub[at] = q;
        return;
    }
    let shift = if i < 16 { 0 } else { 4 };
    sub[at] = (sub[at] & !(0x0f << shift)) | ((q & 0x0f) << shift);
    let bits = high_bits(format);
    if bits > 0 {
        let (at, shift) = high_bits_place(format, c, i);
        let mask = ((1u8 << bits) - 1) << shift;
        sub[at] = (sub[at] & !mask) | (((q >> 4) << shift) & mask);
    }
}

/// Element `e`'s stored quant in a ggml block, as the kernels hold it.
fn stored_quant(format: Format, block: &[u8], e: usize) -> u8 {
    match format {
        Format::Q8_0 => block[2 + e] ^ 0x80,
        Format::Q4_0 | Format::Q4_1 => {
            let qs = &block[block.len() - 16..];
            if e < 16 {
                qs[e] & 0x0f
            } else {
                qs[e - 16] >> 4
            }
        }
        Format::Q5_0 | Format::Q5_1 => format::q5_quant(format, block, e),
        Format::Q4K | Format::Q5K => format::k_quant(format, block, e),
        Format::Q6K => format::q6k_quant(block, e),
    }
}

fn set_stored_quant(format: Format, block: &mut [u8], e: usize, q: u8) {
    match format {
        Format::Q8_0 => block[2 + e] = q ^ 0x80,
        Format::Q4_0 | Format::Q4_1 => {
            let at = block.len() - 16 + e % 16;
            let shift = if e < 16 { 0 } else { 4 };
            block[at] = (block[at] & !(0x0f << shift)) | (q << shift);
        }
        Format::Q5_0 | Format::Q5_1 => format::q5_set_quant(format, block, e, q),
        Format::Q4K | Format::Q5K => format::k_set_quant(format, block, e, q),
        Format::Q6K => format::q6k_set_quant(block, e, q),
    }
}

/// Calls `place(stored offset, unit offset, bytes)` for each run of a stored block's bytes
/// that are not quants, with where feature `c`'s copy lives in a panel unit. (Called for every
/// block of every feature at load: no allocation.)
fn for_scale_places(format: Format, c: usize, mut place: impl FnMut(usize, usize, usize)) {
    let (d, m) = (scales_at(format) + 2 * c, mins_at(format) + 2 * c);
    match kind(format) {
        Kind::Offset => place(0, d, 2),
        Kind::Min | Kind::SubScaled => {
            place(0, d, 2);
            place(2, m, 2);
        }
        Kind::Halves => {
            place(208, d, 2);
            for s in 0..16 {
                place(192 + s, sub_scales_at(format, s) + c, 1);
            }
        }
    }
}

/// Feature `c`'s stored block into its place in a panel unit.
fn pack_block(format: Format, block: &[u8], unit: &mut [u8], c: usize) {
    for_scale_places(format, c, |from, to, len| {
        unit[to..to + len].copy_from_slice(&block[from..from + len])
    });
    if kind(format) == Kind::SubScaled {
        for j in 0..8 {
            let (sc, m) = format::q4k_scale_min(&block[4..16], j);
            unit[sub_scales_at(format, j) + c] = sc;
            unit[sub_mins_at(format, j) + c] = m;
        }
    }
    let sb = sub_bytes(format);
    for e in 0..format.block_elems() {
        let sub = &mut unit[e / BLOCK * sb..][..sb];
        set_quant(format, sub, c, e % BLOCK, stored_quant(format, block, e));
    }
}

/// The inverse of [`pack_block`].
fn unpack_block(format: Format, unit: &[u8], c: usize, block: &mut [u8]) {
    for_scale_places(format, c, |from, to, len| {
        block[from..from + len].copy_from_slice(&unit[to..to + len])
    });
    if kind(format) == Kind::SubScaled {
        let sc = std::array::from_fn(|j| unit[sub_scales_at(format, j) + c]);
        let m = std::array::from_fn(|j| unit[sub_mins_at(format, j) + c]);
        block[4..16].copy_from_slice(&format::q4k_pack_scales(&sc, &m));
    }
    let sb = sub_bytes(format);
    for e in 0..format.block_elems() {
        let sub = &unit[e / BLOCK * sb..][..sb];
        set_stored_quant(format, block, e, quant(format, sub, c, e % BLOCK));
    }
}

/// A `[n, k]` weight (`n` output features of `k` inputs) in the kernels' layout.
#[derive(Clone)]
pub struct PackedMatrix {
    format: Format,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({}, [{}, {}])",
            self.format.name(),
            self.n,
            self.k
        )
    }
}

impl PackedMatrix {
    /// Repacks a matrix stored as ggml blocks (`n` rows of `k / block_elems` blocks each).
    pub fn from_ggml(format: Format, bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        let be = format.block_elems();
        if n == 0 || k == 0 || !k.is_multiple_of(be) {
            return Err(format!(
                "a {} matrix needs k to be a positive multiple of {be}, got [{n}, {k}]",
                format.name()
            ));
        }
        let row_bytes = format.row_bytes(k);
        if bytes.len() != n * row_bytes {
            return Err(format!(
                "a [{n}, {k}] {} matrix takes {} bytes, got {}",
                format.name(),
                n * row_bytes,
                bytes.len()
            ));
        }
        let (units, panels, st, bb) = (
            k / be,
            n.div_ceil(PANEL),
            stride(format),
            format.block_bytes(),
        );
        let mut data = vec![0u8; panels * units * st];
        data.par_chunks_mut(units * st)
            .enumerate()
            .for_each(|(p, panel)| {
                for (u, unit) in panel.chunks_exact_mut(st).enumerate() {
                    for c in 0..PANEL {
                        let row = p * PANEL + c;
                        if row < n {
                            let block = &bytes[row * row_bytes + u * bb..][..bb];
                            pack_block(format, block, unit, c);
                        } else if format == Format::Q8_0 {
                            // Quant 0, stored offset by 128; its scale stays 0.
                            for i in 0..BLOCK {
                                set_quant(format, unit, c, i, 0x80);
                            }
                        }
                    }
                }
            });
        Ok(Self { format, n, k, data })
    }

    /// Several matrices of one format and `k` stacked along their outputs (q/k/v, gate/up),
    /// from their stored bytes: one product then serves all of them.
    pub fn from_ggml_stacked(
        format: Format,
        parts: &[(&[u8], usize)],
        k: usize,
    ) -> Result<Self, String> {
        let n = parts.iter().map(|(_, n)| n).sum();
        let mut bytes = Vec::with_capacity(n * format.row_bytes(k));
        for (part, rows) in parts {
            if part.len() != rows * format.row_bytes(k) {
                return Err(format!(
                    "a stacked part of {rows} rows has {} bytes",
                    part.len()
                ));
            }
            bytes.extend_from_slice(part);
        }
        Self::from_ggml(format, &bytes, n, k)
    }

    /// Several packed matrices of one format and `k` stacked along their outputs. Parts whose
    /// outputs fill whole panels are joined as they are; otherwise the rows are re-interleaved.
    pub fn stack(parts: &[&PackedMatrix]) -> Result<Self, String> {
        let first = parts.first().ok_or("nothing to stack")?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.k != first.k)
        {
            return Err("stacked matrices must share their format and k".to_string());
        }
        let n = parts.iter().map(|p| p.n).sum();
        if parts[..parts.len() - 1]
            .iter()
            .all(|p| p.n.is_multiple_of(PANEL))
        {
            let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
            return Ok(Self {
                format: first.format,
                n,
                k: first.k,
                data,
            });
        }
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.to_ggml()).collect();
        Self::from_ggml(first.format, &bytes, n, first.k)
    }

    /// The matrix back in ggml's stored layout (`n` rows of blocks).
    pub fn to_ggml(&self) -> Vec<u8> {
        let format = self.format;
        let (st, bb) = (stride(format), format.block_bytes());
        let mut out = vec![0u8; self.n * format.row_bytes(self.k)];
        for (row, dst_row) in out.chunks_exact_mut(format.row_bytes(self.k)).enumerate() {
            let (p, c) = (row / PANEL, row % PANEL);
            let panel = self.panel(p).data;
            for (unit, block) in panel.chunks_exact(st).zip(dst_row.chunks_exact_mut(bb)) {
                unpack_block(format, unit, c, block);
            }
        }
        out
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the packed weight holds.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn panel(&self, p: usize) -> Panel<'_> {
        let units = self.k / self.format.block_elems();
        let len = units * stride(self.format);
        Panel {
            format: self.format,
            data: &self.data[p * len..(p + 1) * len],
            units,
        }
    }

    /// `out[r][o] = Σ_i x[r][i] · w[o][i]` for every row of `x`; `out` is row-major
    /// `[x.rows(), n]`. Runs at `level` (lowered to what the CPU has) on the current rayon
    /// pool; every level gives the same bits.
    pub fn matmul(&self, x: &QuantizedRows, level: Level, out: &mut [f32]) {
        assert_eq!(x.k(), self.k, "activation width");
        let (m, n) = (x.rows(), self.n);
        assert_eq!(out.len(), m * n, "output size");
        if m == 0 {
            return;
        }
        let level = level.capped();
        for_each_tile(m, n, out, |p, rows, tile| {
            run_panel(level, self.panel(p), x, rows, tile)
        });
    }

    /// Whether the matrix can be read as a gate projection stacked on an up projection by
    /// [`PackedMatrix::matmul_silu_mul`]: two halves of whole panels.
    pub fn splits_into_gate_up(&self) -> bool {
        self.n.is_multiple_of(2 * PANEL)
    }

    /// For a matrix stacking a gate projection on an up projection of the same width (see
    /// [`PackedMatrix::splits_into_gate_up`]), `out[r][o] = SiLU(gate[r][o]) · up[r][o]` with
    /// `gate`, `up` the two halves of this matrix's product; `out` is row-major
    /// `[x.rows(), n / 2]`. The same bits as [`PackedMatrix::matmul`] followed by
    /// [`crate::silu_mul`] at `level`, without the product ever being stored.
    pub fn matmul_silu_mul(&self, x: &QuantizedRows, level: Level, out: &mut [f32]) {
        assert_eq!(x.k(), self.k, "activation width");
        assert!(
            self.splits_into_gate_up(),
            "{} features do not split into gate and up",
            self.n
        );
        let level = level.capped();
        for_each_gated_tile(x.rows(), self.n / 2, level, out, |p, rows, tile| {
            run_panel(level, self.panel(p), x, rows, tile)
        });
    }
}

/// Calls `each(panel, rows, buffers)` for every (row chunk, panel) of `m` rows over `panels`
/// panels on the current rayon pool: tasks are runs of whole panels, enough of them for rayon
/// to balance; a panel stays in cache while a task's rows sweep it. Each task has `B` buffers
/// of its own, a row of 16 per row of its chunk.
fn sweep<const B: usize>(
    m: usize,
    panels: usize,
    each: impl Fn(usize, Range<usize>, &mut [&mut [[f32; PANEL]]; B]) + Sync,
) {
    if m == 0 || panels == 0 {
        return;
    }
    let row_chunks = m.div_ceil(ROW_CHUNK);
    let groups = (8 * rayon::current_num_threads())
        .div_ceil(row_chunks)
        .clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    (0..row_chunks * groups).into_par_iter().for_each(|task| {
        let rows = {
            let c = task / groups;
            c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(m)
        };
        let g = task % groups;
        // Only the chunk's rows are initialized: a decode task has one row, and zeroing whole
        // 64-row buffers per task cost SmolLM2's one-row decode step 0.3–0.5 ms.
        let mut storage =
            [const { [const { MaybeUninit::<[f32; PANEL]>::uninit() }; ROW_CHUNK] }; B];
        let mut buffers = storage.each_mut().map(|buffer| {
            let buffer = &mut buffer[..rows.len()];
            for row in buffer.iter_mut() {
                row.write([0.0; PANEL]);
            }
            // SAFETY: every element of `buffer` was just written.
            unsafe { &mut *(buffer as *mut [MaybeUninit<[f32; PANEL]>] as *mut [[f32; PANEL]]) }
        });
        for p in g * per_group..((g + 1) * per_group).min(panels) {
            each(p, rows.clone(), &mut buffers);
        }
    });
}

/// Runs `tile(panel, rows, out)` for every (row chunk, panel) of an `[m, n]` product (see
/// [`sweep`]) and writes each tile into row-major `out`.
pub(crate) fn for_each_tile(
    m: usize,
    n: usize,
    out: &mut [f32],
    tile: impl Fn(usize, Range<usize>, &mut [[f32; PANEL]]) + Sync,
) {
    assert_eq!(out.len(), m * n, "output size");
    let out_ptr = SharedOut(out.as_mut_ptr());
    sweep(m, n.div_ceil(PANEL), |p, rows, [buf]| {
        tile(p, rows.clone(), buf);
        let (col0, cols) = (p * PANEL, PANEL.min(n - p * PANEL));
        for (r, vals) in rows.zip(buf.iter()) {
            // SAFETY: tasks write disjoint (row chunk, panel) rectangles of `out`, whose
            // size was checked above. A whole panel is a copy of constant size (one
            // register), not a call to `memcpy` per row.
            unsafe {
                let to = out_ptr.at(r * n + col0);
                if cols == PANEL {
                    std::ptr::copy_nonoverlapping(vals.as_ptr(), to, PANEL);
                } else {
                    std::ptr::copy_nonoverlapping(vals.as_ptr(), to, cols);
                }
            }
        }
    });
}

/// As [`for_each_tile`] for a matrix that stacks a gate projection on an up projection of
/// `width` features each (`width` a multiple of [`PANEL`], so gate panel `p` and up panel
/// `p + width / PANEL` hold the same features): writes `out[r][o] = SiLU(gate[r][o]) ·
/// up[r][o]` into row-major `out: [m, width]` straight from each task's two panels, so the
/// `[m, 2·width]` product is never stored. The same bits as the product followed by
/// [`crate::silu_mul`] at `level`.
///
/// Below [`GATED_MIN_ROWS`] rows the product is computed and stored first: such a step streams
/// the weights from memory, and reading the gate and up halves as two interleaved streams
/// made the 1B shape's one-row decode step 13% slower, while its small product costs nothing
/// to store. From a full row tile on the product is compute-bound and storing it is the cost.
pub(crate) fn for_each_gated_tile(
    m: usize,
    width: usize,
    level: Level,
    out: &mut [f32],
    tile: impl Fn(usize, Range<usize>, &mut [[f32; PANEL]]) + Sync,
) {
    assert!(
        width.is_multiple_of(PANEL),
        "gate width {width} is not a multiple of {PANEL}"
    );
    assert_eq!(out.len(), m * width, "output size");
    if m < GATED_MIN_ROWS {
        let mut product = vec![0f32; m * 2 * width];
        for_each_tile(m, 2 * width, &mut product, tile);
        for (o, y) in out
            .chunks_exact_mut(width)
            .zip(product.chunks_exact(2 * width))
        {
            let (gate, up) = y.split_at(width);
            crate::silu_mul(level, gate, up, o);
        }
        return;
    }
    let half = width / PANEL;
    let out_ptr = SharedOut(out.as_mut_ptr());
    sweep(m, half, |p, rows, [gate, up, act]| {
        tile(p, rows.clone(), gate);
        tile(p + half, rows.clone(), up);
        // One call for the chunk's rows: per row, the call cost as much as its 16 values.
        crate::silu_mul(
            level,
            gate.as_flattened(),
            up.as_flattened(),
            act.as_flattened_mut(),
        );
        for (r, vals) in rows.zip(act.iter()) {
            // SAFETY: as in `for_each_tile`: tasks write disjoint (row chunk, panel)
            // rectangles of `out`, whose size was checked above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    vals.as_ptr(),
                    out_ptr.at(r * width + p * PANEL),
                    PANEL,
                )
            };
        }
    });
}

/// The output buffer, written by tasks at disjoint places.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: see `for_each_tile`: every element is written by exactly one task.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay within the buffer.
        unsafe { self.0.add(i) }
    }
}

/// One panel of a [`PackedMatrix`]: 16 output features over all `units` stored blocks of `k`.
#[derive(Clone, Copy)]
pub(crate) struct Panel<'a> {
    pub format: Format,
    pub data: &'a [u8],
    pub units: usize,
}

/// One panel against `rows` of `x` at `level`, into `out` (a row of 16 per activation row).
fn run_panel(
    level: Level,
    panel: Panel,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    debug_assert_eq!(panel.data.len(), panel.units * stride(panel.format));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::capped` only yields levels the CPU was detected to run.
        Level::Avx512 => unsafe { crate::x86::avx512::panel(panel, x, rows, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { crate::x86::avx2::panel(panel, x, rows, out) },
        _ => scalar_panel(panel, x, rows, out),
    }
}

/// The portable twin: the same integer dot products and the same float operations in the same
/// order as the SIMD levels (see [`Kind`]); each `+=` is one fused multiply-add. A row's
/// refined blocks (their second pass) follow its first pass over every block, in block order.
fn scalar_panel(panel: Panel, x: &QuantizedRows, rows: Range<usize>, out: &mut [[f32; PANEL]]) {
    let (format, st, sb) = (panel.format, stride(panel.format), sub_bytes(panel.format));
    let sub = |b: usize| {
        let (u, j) = (b / subs(format), b % subs(format));
        let unit = &panel.data[u * st..(u + 1) * st];
        (unit, j, &unit[j * sb..(j + 1) * sb])
    };
    for (acc, r) in out.iter_mut().zip(rows) {
        *acc = [0.0; PANEL];
        for b in 0..panel.units * subs(format) {
            let (unit, j, quants) = sub(b);
            scalar_block(format, unit, j, quants, x.row(r), b, acc);
        }
        for &b in x.refined_in(r) {
            let (unit, j, quants) = sub(b as usize);
            scalar_block(format, unit, j, quants, x.residual_row(r), b as usize, acc);
        }
    }
}

/// `acc += ` sub-block `j` of `unit` (quants `sub`) times activation block `b` of `a`, for the
/// 16 features.
fn scalar_block(
    format: Format,
    unit: &[u8],
    j: usize,
    sub: &[u8],
    a: RowBlocks<'_>,
    b: usize,
    acc: &mut [f32; PANEL],
) {
    let off = offset(format);
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let (qs, da, isum) = (&a.qs[b * BLOCK..(b + 1) * BLOCK], a.scales[b], a.sums[b]);
    for (c, acc) in acc.iter_mut().enumerate() {
        let mut dots = [0i32; 2];
        for (i, &a) in qs.iter().enumerate() {
            dots[i / 16] += quant(format, sub, c, i) as i32 * a as i32;
        }
        let dot = dots[0] + dots[1];
        let d = f16_at(unit, scales_at(format) + 2 * c);
        let mins = || f16_at(unit, mins_at(format) + 2 * c);
        match kind(format) {
            Kind::Offset => {
                *acc = ((dot - off * isum) as f32).mul_add(d * da, *acc);
            }
            Kind::Min => {
                *acc = (dot as f32).mul_add(d * da, *acc);
                *acc = mins().mul_add(da * isum as f32, *acc);
            }
            Kind::SubScaled => {
                let dj = d * unit[sub_scales_at(format, j) + c] as f32;
                let mj = mins() * unit[sub_mins_at(format, j) + c] as f32;
                *acc = (dot as f32).mul_add(dj * da, *acc);
                *acc = mj.mul_add(-(da * isum as f32), *acc);
            }
            Kind::Halves => {
                let sc = |h: usize| unit[sub_scales_at(format, 2 * j + h) + c] as i8;
                let lo = a.half_sums[b];
                let t = sc(0) as i32 * (dots[0] - off * lo)
                    + sc(1) as i32 * (dots[1] - off * (isum - lo));
                *acc = (t as f32).mul_add(d * da, *acc);
            }
        }
    }
}
