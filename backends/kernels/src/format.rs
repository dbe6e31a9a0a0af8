//! The GGUF (ggml) block formats the kernels read, as stored in files, and a plain
//! dequantizer that is the reference every kernel is tested against.

use half::f16;

/// Elements per block in every format here.
pub const BLOCK: usize = 32;

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
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Q8_0, Format::Q4_0, Format::Q4_1];

    /// Bytes of one stored block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
        }
    }

    /// llama.cpp's name.
    pub const fn name(self) -> &'static str {
        match self {
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
        }
    }

    /// Bytes of a stored row of `k` elements.
    pub const fn row_bytes(self, k: usize) -> usize {
        k / BLOCK * self.block_bytes()
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// One stored block as 32 f32 weights.
pub fn dequantize_block(format: Format, block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    match format {
        Format::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
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
    }
}

/// A stored `[rows, k]` matrix as f32, row-major.
pub fn dequantize(format: Format, bytes: &[u8], rows: usize, k: usize) -> Vec<f32> {
    assert_eq!(bytes.len(), rows * format.row_bytes(k), "matrix size");
    let mut out = vec![0f32; rows * k];
    for (block, o) in bytes
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(BLOCK))
    {
        dequantize_block(format, block, o);
    }
    out
}

/// Quantizes a `[rows, k]` f32 matrix into `format` as llama.cpp's reference quantizers do
/// (for `--quantize` at load and for tests).
pub fn quantize(format: Format, x: &[f32], rows: usize, k: usize) -> Vec<u8> {
    assert!(k.is_multiple_of(BLOCK) && x.len() == rows * k, "shape");
    let mut out = Vec::with_capacity(rows * format.row_bytes(k));
    for b in x.chunks_exact(BLOCK) {
        match format {
            Format::Q8_0 => {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
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
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_then_dequantize_is_close_for_every_format() {
        let k = 64;
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
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= bound, "{format:?}: {a} vs {b}");
            }
        }
    }
}
