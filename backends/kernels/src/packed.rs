//! Weight matrices repacked at load for the kernels, and the threaded matmul over them.
//!
//! Layout: output features (the matrix's rows) are grouped in panels of [`PANEL`] = 16. A
//! panel holds, block after block along `k`, the 32 quants of each of its 16 features
//! interleaved four bytes at a time (`[group 0..8][feature 0..16][4 bytes]`, so one 64-byte
//! load holds four consecutive quants of all 16 features), then their 16 f16 scales, then (Q4_1)
//! their 16 f16 minimums. Q4 panels keep two groups per byte (group `g` in the low nibbles,
//! group `g + 4` in the high ones: exactly the stored bytes, re-interleaved); Q8_0 quants are
//! stored offset by 128 as `u8`, so every format feeds the `u8 × i8` dot-product instructions
//! and subtracts its offset once per block through the activation block sums. The last panel
//! is padded with zero scales.
//!
//! A panel of 16 features over k = 2048 is 9–17 KiB, so while a thread sweeps the activation
//! rows over it, the panel stays in L1/L2: each weight byte comes from memory once per step
//! whatever the number of rows.

use std::ops::Range;

use rayon::prelude::*;

use crate::activation::QuantizedRows;
use crate::format::{Format, BLOCK};
use crate::level::Level;

/// Output features per panel.
pub const PANEL: usize = 16;

/// Activation rows one task sweeps over a panel before moving on.
const ROW_CHUNK: usize = 64;

/// Bytes of the interleaved quants of one panel block.
pub(crate) const fn quant_bytes(format: Format) -> usize {
    match format {
        Format::Q8_0 => PANEL * BLOCK,
        Format::Q4_0 | Format::Q4_1 => PANEL * BLOCK / 2,
    }
}

/// Bytes of one panel block: quants, scales, minimums.
pub(crate) const fn stride(format: Format) -> usize {
    let scales = 2 * PANEL;
    match format {
        Format::Q4_1 => quant_bytes(format) + 2 * scales,
        _ => quant_bytes(format) + scales,
    }
}

/// What the stored `u8` quants are offset by (subtracted through the block sums).
pub(crate) const fn offset(format: Format) -> i32 {
    match format {
        Format::Q8_0 => 128,
        Format::Q4_0 => 8,
        Format::Q4_1 => 0,
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
    /// Repacks a matrix stored as ggml blocks (`n` rows of `k / 32` blocks each).
    pub fn from_ggml(format: Format, bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        if n == 0 || k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(format!(
                "a {} matrix needs k to be a positive multiple of {BLOCK}, got [{n}, {k}]",
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
        let (nb, panels, st, qb) = (
            k / BLOCK,
            n.div_ceil(PANEL),
            stride(format),
            quant_bytes(format),
        );
        let mut data = vec![0u8; panels * nb * st];
        data.par_chunks_mut(nb * st)
            .enumerate()
            .for_each(|(p, panel)| {
                for (b, dst) in panel.chunks_exact_mut(st).enumerate() {
                    for c in 0..PANEL {
                        let row = p * PANEL + c;
                        if row >= n {
                            if format == Format::Q8_0 {
                                // Quant 0, stored offset by 128; its scale stays 0.
                                for g in 0..8 {
                                    dst[(g * PANEL + c) * 4..][..4].fill(0x80);
                                }
                            }
                            continue;
                        }
                        let block = &bytes[row * row_bytes + b * format.block_bytes()..]
                            [..format.block_bytes()];
                        dst[qb + 2 * c..qb + 2 * c + 2].copy_from_slice(&block[0..2]);
                        match format {
                            Format::Q8_0 => {
                                for g in 0..8 {
                                    for j in 0..4 {
                                        dst[(g * PANEL + c) * 4 + j] = block[2 + 4 * g + j] ^ 0x80;
                                    }
                                }
                            }
                            Format::Q4_0 | Format::Q4_1 => {
                                let qs = if format == Format::Q4_1 {
                                    dst[qb + 2 * PANEL + 2 * c..][..2]
                                        .copy_from_slice(&block[2..4]);
                                    &block[4..20]
                                } else {
                                    &block[2..18]
                                };
                                for h in 0..4 {
                                    dst[(h * PANEL + c) * 4..][..4]
                                        .copy_from_slice(&qs[4 * h..4 * h + 4]);
                                }
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
        let (format, nb) = (self.format, self.k / BLOCK);
        let (st, qb, bb) = (stride(format), quant_bytes(format), format.block_bytes());
        let mut out = vec![0u8; self.n * format.row_bytes(self.k)];
        for (row, dst_row) in out.chunks_exact_mut(format.row_bytes(self.k)).enumerate() {
            let (p, c) = (row / PANEL, row % PANEL);
            let panel = self.panel(p).data;
            for (b, dst) in dst_row.chunks_exact_mut(bb).enumerate() {
                let src = &panel[b * st..(b + 1) * st];
                dst[0..2].copy_from_slice(&src[qb + 2 * c..qb + 2 * c + 2]);
                match format {
                    Format::Q8_0 => {
                        for g in 0..8 {
                            for j in 0..4 {
                                dst[2 + 4 * g + j] = src[(g * PANEL + c) * 4 + j] ^ 0x80;
                            }
                        }
                    }
                    Format::Q4_0 | Format::Q4_1 => {
                        let at = if format == Format::Q4_1 {
                            dst[2..4].copy_from_slice(&src[qb + 2 * PANEL + 2 * c..][..2]);
                            4
                        } else {
                            2
                        };
                        for h in 0..4 {
                            dst[at + 4 * h..at + 4 * h + 4]
                                .copy_from_slice(&src[(h * PANEL + c) * 4..][..4]);
                        }
                    }
                }
            }
            debug_assert!(nb * bb == dst_row.len());
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
        let blocks = self.k / BLOCK;
        let len = blocks * stride(self.format);
        Panel {
            format: self.format,
            data: &self.data[p * len..(p + 1) * len],
            blocks,
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
        let panels = n.div_ceil(PANEL);
        let row_chunks = m.div_ceil(ROW_CHUNK);
        // Enough tasks for rayon to balance, each a run of whole panels.
        let groups = (8 * rayon::current_num_threads())
            .div_ceil(row_chunks)
            .clamp(1, panels);
        let per_group = panels.div_ceil(groups);
        let out_ptr = SharedOut(out.as_mut_ptr());
        (0..row_chunks * groups).into_par_iter().for_each(|task| {
            let rows = {
                let c = task / groups;
                c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(m)
            };
            let g = task % groups;
            let mut tile = [[0f32; PANEL]; ROW_CHUNK];
            for p in g * per_group..((g + 1) * per_group).min(panels) {
                let tile = &mut tile[..rows.len()];
                run_panel(level, self.panel(p), x, rows.clone(), tile);
                let (col0, cols) = (p * PANEL, PANEL.min(n - p * PANEL));
                for (r, vals) in rows.clone().zip(tile.iter()) {
                    // SAFETY: tasks write disjoint (row chunk, panel) rectangles of `out`, whose
                    // size was checked above.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            vals.as_ptr(),
                            out_ptr.at(r * n + col0),
                            cols,
                        );
                    }
                }
            }
        });
    }
}

/// The output buffer, written by tasks at disjoint places.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: see `PackedMatrix::matmul`: every element is written by exactly one task.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay within the buffer.
        unsafe { self.0.add(i) }
    }
}

/// One panel of a [`PackedMatrix`]: 16 output features over all `blocks` blocks of `k`.
#[derive(Clone, Copy)]
pub(crate) struct Panel<'a> {
    pub format: Format,
    pub data: &'a [u8],
    pub blocks: usize,
}

/// One panel against `rows` of `x` at `level`, into `out` (a row of 16 per activation row).
fn run_panel(
    level: Level,
    panel: Panel,
    x: &QuantizedRows,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    debug_assert_eq!(panel.data.len(), panel.blocks * stride(panel.format));
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
/// order as the SIMD levels.
fn scalar_panel(panel: Panel, x: &QuantizedRows, rows: Range<usize>, out: &mut [[f32; PANEL]]) {
    let Panel {
        format,
        data: panel,
        blocks: nb,
    } = panel;
    let (st, qb, off) = (stride(format), quant_bytes(format), offset(format));
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    for (acc, r) in out.iter_mut().zip(rows) {
        let (qs, scales, sums) = (x.row_qs(r), x.row_scales(r), x.row_sums(r));
        *acc = [0.0; PANEL];
        for b in 0..nb {
            let blk = &panel[b * st..(b + 1) * st];
            let a = &qs[b * BLOCK..(b + 1) * BLOCK];
            let (da, isum) = (scales[b], sums[b]);
            for (c, acc) in acc.iter_mut().enumerate() {
                let mut dot = 0i32;
                for g in 0..8 {
                    for j in 0..4 {
                        let u = match format {
                            Format::Q8_0 => blk[(g * PANEL + c) * 4 + j],
                            _ if g < 4 => blk[(g * PANEL + c) * 4 + j] & 0x0f,
                            _ => blk[((g - 4) * PANEL + c) * 4 + j] >> 4,
                        };
                        dot += u as i32 * a[4 * g + j] as i32;
                    }
                }
                let d = f16_at(blk, qb + 2 * c);
                *acc = ((dot - off * isum) as f32).mul_add(d * da, *acc);
                if format == Format::Q4_1 {
                    let m = f16_at(blk, qb + 2 * PANEL + 2 * c);
                    *acc = m.mul_add(da * isum as f32, *acc);
                }
            }
        }
    }
}
