//! The GGUF (ggml) block formats the kernels read, as stored in files, and a plain
//! dequantizer that is the reference every kernel is tested against.

use half::f16;

/// Elements per activation block, and per sub-block of the K formats' super-blocks.
pub const BLOCK: usize = 32;

/// Elements per super-block of the K formats.
pub const SUPER_BLOCK: usize = 256;

/// A ggml block format of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `d: f16, qs: [i8; 32]`; `w = d·q`.
    Q8_0,
    /// `d: f16, qs: [u8; 16]`, element `j` in the low nibble of byte `j`, element `j + 16` in
    /// the high one; `w = d·(q − 8)`.
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]` (nibbles as Q4_0); `w = d·q + m`.
    Q4_1,
    /// Super-blocks of 256: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Sub-block
    /// `j` (32 elements) has a 6-bit scale `sc` and min `m` packed in `scales`; its quants are
    /// the low (`j` even) or high (`j` odd) nibbles of `qs[32·(j/2)..][..32]`;
    /// `w = d·sc·q − dmin·m`.
    Q4K,
    /// `d: f16, qh: u32, qs: [u8; 16]`: Q4_0's nibbles plus bit `j` of `qh` as element `j`'s
    /// fifth bit; `w = d·(q − 16)`.
    Q5_0,
    /// `d: f16, m: f16, qh: u32, qs: [u8; 16]` (bits as Q5_0); `w = d·q + m`.
    Q5_1,
    /// Super-blocks of 256: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`:
    /// Q4_K's layout plus bit `j` of `qh[e % 32]` as the fifth bit of element `e` of sub-block
    /// `j`; `w = d·sc·q − dmin·m`.
    Q5K,
    /// Super-blocks of 256: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Element
    /// `e` (`n = e/128`, `t = e%128/32`, `l = e%32`) has 6 bits: the low (`t < 2`) or high
    /// nibble of `ql[64n + 32(t%2) + l]` and bits `2t..2t+2` of `qh[32n + l]`;
    /// `w = d·scales[e/16]·(q − 32)`.
    Q6K,
}

impl Format {
    pub const ALL: [Format; 8] = [
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    /// Elements per stored block.
    #[inline(always)]
    pub const fn block_elems(self) -> usize {
        match self {
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => BLOCK,
            Format::Q4K | Format::Q5K | Format::Q6K => SUPER_BLOCK,
        }
    }

    /// Bytes of one stored block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    /// llama.cpp's name.
    pub const fn name(self) -> &'static str {
        match self {
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q4K => "q4_k",
            Format::Q5K => "q5_k",
            Format::Q6K => "q6_k",
        }
    }

    /// Bytes of a stored row of `k` elements.
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_elems() * self.block_bytes()
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_K sub-block `j`'s 6-bit scale and min from a block's 12 packed scale bytes.
pub(crate) fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// The inverse of [`q4k_scale_min`]: eight 6-bit scales and mins packed into 12 bytes.
pub(crate) fn q4k_pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    out
}

/// Where a Q4_K/Q5_K quant's low 4 bits sit: their byte in the block and shift (0 or 4).
const fn k_nibble_place(format: Format, e: usize) -> (usize, u32) {
    let qs = match format {
        Format::Q5K => 48,
        _ => 16,
    };
    let (j, i) = (e / BLOCK, e % BLOCK);
    (qs + 32 * (j / 2) + i, 4 * (j % 2) as u32)
}

/// Element `e`'s quant in a Q4_K (4 bits) or Q5_K (5 bits) block.
pub(crate) fn k_quant(format: Format, block: &[u8], e: usize) -> u8 {
    let (at, shift) = k_nibble_place(format, e);
    let q = (block[at] >> shift) & 0x0f;
    match format {
        Format::Q5K => q | (((block[16 + e % 32] >> (e / 32)) & 1) << 4),
        _ => q,
    }
}

pub(crate) fn k_set_quant(format: Format, block: &mut [u8], e: usize, q: u8) {
    let (at, shift) = k_nibble_place(format, e);
    block[at] = (block[at] & !(0x0f << shift)) | ((q & 0x0f) << shift);
    if format == Format::Q5K {
        let (at, bit) = (16 + e % 32, e / 32);
        block[at] = (block[at] & !(1 << bit)) | (((q >> 4) & 1) << bit);
    }
}

/// Where Q5_0/Q5_1 keep `qh` and `qs`.
const fn q5_parts(format: Format) -> (usize, usize) {
    match format {
        Format::Q5_1 => (4, 8),
        _ => (2, 6),
    }
}

/// Element `e`'s 5-bit quant in a Q5_0/Q5_1 block.
pub(crate) fn q5_quant(format: Format, block: &[u8], e: usize) -> u8 {
    let (qh, qs) = q5_parts(format);
    let nib = if e < 16 {
        block[qs + e] & 0x0f
    } else {
        block[qs + e - 16] >> 4
    };
    nib | (((block[qh + e / 8] >> (e % 8)) & 1) << 4)
}

pub(crate) fn q5_set_quant(format: Format, block: &mut [u8], e: usize, q: u8) {
    let (qh, qs) = q5_parts(format);
    let (at, shift) = (qs + e % 16, if e < 16 { 0 } else { 4 });
    block[at] = (block[at] & !(0x0f << shift)) | ((q & 0x0f) << shift);
    let (at, bit) = (qh + e / 8, e % 8);
    block[at] = (block[at] & !(1 << bit)) | (((q >> 4) & 1) << bit);
}

/// Where a Q6_K quant sits: its `ql` byte and shift, its `qh` byte and shift.
const fn q6k_place(e: usize) -> (usize, u32, usize, u32) {
    let (n, t, l) = (e / 128, e % 128 / 32, e % 32);
    (
        64 * n + 32 * (t % 2) + l,
        4 * (t / 2) as u32,
        128 + 32 * n + l,
        2 * t as u32,
    )
}

/// Element `e`'s 6-bit quant (0..64, the stored value before the −32) in a Q6_K block.
pub(crate) fn q6k_quant(block: &[u8], e: usize) -> u8 {
    let (l, ls, h, hs) = q6k_place(e);
    ((block[l] >> ls) & 0x0f) | (((block[h] >> hs) & 3) << 4)
}

pub(crate) fn q6k_set_quant(block: &mut [u8], e: usize, q: u8) {
    let (l, ls, h, hs) = q6k_place(e);
    block[l] = (block[l] & !(0x0f << ls)) | ((q & 0x0f) << ls);
    block[h] = (block[h] & !(3 << hs)) | (((q >> 4) & 3) << hs);
}

/// One stored block as `format.block_elems()` f32 weights.
pub fn dequantize_block(format: Format, block: &[u8], out: &mut [f32]) {
    match format {
        Format::Q8_0 => {
            let d = f16_at(block, 0);
            for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
            let d = f16_at(block, 0);
            let (m, qs) = match format {
                Format::Q4_1 => (f16_at(block, 2), &block[4..20]),
                _ => (0.0, &block[2..18]),
            };
            for (j, &byte) in qs.iter().enumerate() {
                let (lo, hi) = ((byte & 0x0f) as f32, (byte >> 4) as f32);
                if format == Format::Q4_0 {
                    out[j] = d * (lo - 8.0);
                    out[j + 16] = d * (hi - 8.0);
                } else {
                    out[j] = d * lo + m;
                    out[j + 16] = d * hi + m;
                }
            }
        }
        Format::Q5_0 | Format::Q5_1 => {
            let d = f16_at(block, 0);
            for (e, o) in out[..BLOCK].iter_mut().enumerate() {
                let q = q5_quant(format, block, e) as f32;
                *o = match format {
                    Format::Q5_1 => d * q + f16_at(block, 2),
                    _ => d * (q - 16.0),
                };
            }
        }
        Format::Q4K | Format::Q5K => {
            let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
            for (e, o) in out[..SUPER_BLOCK].iter_mut().enumerate() {
                let (sc, m) = q4k_scale_min(&block[4..16], e / BLOCK);
                *o = d * sc as f32 * k_quant(format, block, e) as f32 - dmin * m as f32;
            }
        }
        Format::Q6K => {
            let d = f16_at(block, 208);
            for (e, o) in out[..SUPER_BLOCK].iter_mut().enumerate() {
                let sc = block[192 + e / 16] as i8;
                *o = d * sc as f32 * (q6k_quant(block, e) as i32 - 32) as f32;
            }
        }
    }
}

/// A stored `[rows, k]` matrix as f32, row-major.
pub fn dequantize(format: Format, bytes: &[u8], rows: usize, k: usize) -> Vec<f32> {
    assert_eq!(bytes.len(), rows * format.row_bytes(k), "matrix size");
    let mut out = vec![0f32; rows * k];
    for (block, o) in bytes
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(format.block_elems()))
    {
        dequantize_block(format, block, o);
    }
    out
}

/// Quantizes a `[rows, k]` f32 matrix into `format`: Q8_0/Q4_0/Q4_1 as llama.cpp's reference
/// quantizers do; Q4_K/Q6_K by plain min/max scales (llama.cpp searches for better ones: the
/// layout, which is what the kernels read, is the same). For tests and benchmarks.
pub fn quantize(format: Format, x: &[f32], rows: usize, k: usize) -> Vec<u8> {
    assert!(
        k.is_multiple_of(format.block_elems()) && x.len() == rows * k,
        "shape"
    );
    let mut out = Vec::with_capacity(rows * format.row_bytes(k));
    for b in x.chunks_exact(format.block_elems()) {
        match format {
            Format::Q8_0 => {
                let (d, qs) = q8_0_block(b);
                out.extend_from_slice(&d.to_le_bytes());
                out.extend(qs.iter().map(|&q| q as u8));
            }
            Format::Q4_0 => {
                // The signed value of largest magnitude maps to −8.
                let max = b
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
            Format::Q4_1 => {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
            Format::Q5_0 => {
                let max = b
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = f16::from_f32(max / -16.0);
                let mut block = [0u8; 22];
                block[0..2].copy_from_slice(&d.to_le_bytes());
                for (e, &v) in b.iter().enumerate() {
                    let q = level(v, d.to_f32(), -16, 15) + 16;
                    q5_set_quant(format, &mut block, e, q as u8);
                }
                out.extend_from_slice(&block);
            }
            Format::Q5_1 => {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (d, m) = (f16::from_f32((max - min) / 31.0), f16::from_f32(min));
                let mut block = [0u8; 24];
                block[0..2].copy_from_slice(&d.to_le_bytes());
                block[2..4].copy_from_slice(&m.to_le_bytes());
                for (e, &v) in b.iter().enumerate() {
                    let q = level(v - m.to_f32(), d.to_f32(), 0, 31);
                    q5_set_quant(format, &mut block, e, q as u8);
                }
                out.extend_from_slice(&block);
            }
            Format::Q4K | Format::Q5K => out.extend_from_slice(&quantize_k(format, b)),
            Format::Q6K => out.extend_from_slice(&quantize_q6k(b)),
        }
    }
    out
}

/// One block of 32 values as llama.cpp's reference Q8_0 quantizer does: `d` = the largest
/// magnitude / 127 (stored as f16), quants `round(x / d)` with the unrounded `d`.
pub(crate) fn q8_0_block(x: &[f32]) -> (f16, [i8; BLOCK]) {
    assert_eq!(x.len(), BLOCK, "a Q8_0 block is 32 values");
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (
        f16::from_f32(d),
        std::array::from_fn(|i| (x[i] * id).round() as i8),
    )
}

/// Rounds `v / step` to the nearest integer in `lo..=hi` (0 when the step is 0).
fn level(v: f32, step: f32, lo: i32, hi: i32) -> i32 {
    if step == 0.0 {
        0
    } else {
        ((v / step).round() as i32).clamp(lo, hi)
    }
}

fn quantize_k(format: Format, x: &[f32]) -> Vec<u8> {
    // Each sub-block's range [−min, max] onto 0..top, then the scales and mins onto 6 bits.
    let top = if format == Format::Q5K { 31 } else { 15 };
    let mut scale = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(BLOCK).enumerate() {
        let lo = sub.iter().copied().fold(0f32, f32::min);
        let hi = sub.iter().copied().fold(0f32, f32::max);
        scale[j] = (hi - lo) / top as f32;
        mins[j] = -lo;
    }
    let d = f16::from_f32(scale.iter().copied().fold(0f32, f32::max) / 63.0);
    let dmin = f16::from_f32(mins.iter().copied().fold(0f32, f32::max) / 63.0);
    let sc: [u8; 8] = std::array::from_fn(|j| level(scale[j], d.to_f32(), 0, 63) as u8);
    let m: [u8; 8] = std::array::from_fn(|j| level(mins[j], dmin.to_f32(), 0, 63) as u8);
    let mut out = vec![0u8; format.block_bytes()];
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&q4k_pack_scales(&sc, &m));
    for (e, &v) in x.iter().enumerate() {
        let j = e / BLOCK;
        let step = d.to_f32() * sc[j] as f32;
        let q = level(v + dmin.to_f32() * m[j] as f32, step, 0, top);
        k_set_quant(format, &mut out, e, q as u8);
    }
    out
}

fn quantize_q6k(x: &[f32]) -> [u8; 210] {
    // Each group of 16 onto −32..31 (its signed extreme to −32), the group scales onto i8.
    let group: [f32; 16] = std::array::from_fn(|s| {
        let max = x[16 * s..16 * (s + 1)]
            .iter()
            .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        max / -32.0
    });
    let amax = group.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let mut out = [0u8; 210];
    for (s, &g) in group.iter().enumerate() {
        out[192 + s] = level(g, d.to_f32(), -128, 127) as i8 as u8;
    }
    out[208..210].copy_from_slice(&d.to_le_bytes());
    for (e, &v) in x.iter().enumerate() {
        let step = d.to_f32() * out[192 + e / 16] as i8 as f32;
        let q = level(v, step, -32, 31) + 32;
        q6k_set_quant(&mut out, e, q as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_then_dequantize_is_close_for_every_format() {
        let k = 256;
        let x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for format in Format::ALL {
            let q = quantize(format, &x, 2, k);
            assert_eq!(q.len(), 2 * format.row_bytes(k));
            let y = dequantize(format, &q, 2, k);
            // Half a step of the coarsest grid (4 bits over a range of 4) plus f16 rounding.
            // Q4_0 maps the extreme of one sign to −8, so the other sign's extreme may clip
            // to +7: a whole step.
            let bound = match format {
                Format::Q8_0 => 2.0 / 127.0 / 2.0 + 1e-2,
                Format::Q4_0 => 2.0 / 8.0 + 1e-2,
                Format::Q4_1 => 4.0 / 15.0 / 2.0 + 2e-2,
                // 6-bit scales and mins: a rounded scale can clip the top by a step.
                Format::Q5_0 => 2.0 / 16.0 + 1e-2,
                Format::Q5_1 => 4.0 / 31.0 / 2.0 + 2e-2,
                Format::Q4K => 4.0 / 15.0 + 5e-2,
                Format::Q5K => 4.0 / 31.0 + 5e-2,
                Format::Q6K => 2.0 / 32.0 + 2e-2,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= bound, "{format:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn k_scales_pack_and_unpack() {
        let sc = [0, 1, 17, 63, 32, 5, 48, 62];
        let m = [63, 0, 2, 33, 16, 61, 1, 40];
        let packed = q4k_pack_scales(&sc, &m);
        for j in 0..8 {
            assert_eq!(q4k_scale_min(&packed, j), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn k_quants_have_one_place_each() {
        let mut q4 = [0u8; 144];
        let mut q5 = [0u8; 176];
        let mut q6 = [0u8; 210];
        for e in 0..SUPER_BLOCK {
            k_set_quant(Format::Q4K, &mut q4, e, (e * 7 % 16) as u8);
            k_set_quant(Format::Q5K, &mut q5, e, (e * 13 % 32) as u8);
            q6k_set_quant(&mut q6, e, (e * 11 % 64) as u8);
        }
        for e in 0..SUPER_BLOCK {
            assert_eq!(k_quant(Format::Q4K, &q4, e), (e * 7 % 16) as u8);
            assert_eq!(k_quant(Format::Q5K, &q5, e), (e * 13 % 32) as u8);
            assert_eq!(q6k_quant(&q6, e), (e * 11 % 64) as u8);
        }
        assert_eq!(&q4[..16], &[0; 16], "quants stay out of the scales");
        assert_eq!(&q5[..16], &[0; 16], "quants stay out of the scales");
        assert_eq!(&q6[192..], &[0; 18], "quants stay out of the scales");
        for format in [Format::Q5_0, Format::Q5_1] {
            let mut b = vec![0u8; format.block_bytes()];
            for e in 0..BLOCK {
                q5_set_quant(format, &mut b, e, (e * 5 % 32) as u8);
            }
            for e in 0..BLOCK {
                assert_eq!(q5_quant(format, &b, e), (e * 5 % 32) as u8);
            }
            let scales = if format == Format::Q5_1 { 4 } else { 2 };
            assert!(b[..scales].iter().all(|&v| v == 0), "{format:?}");
        }
    }
}
