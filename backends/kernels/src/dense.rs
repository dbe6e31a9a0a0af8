//! bf16 weights (as Hugging Face checkpoints store them) kept in bf16: half the memory and half
//! the bytes per step of an f32 copy. Activations stay f32; each weight is widened to f32
//! (exactly: a bf16 is the top half of an f32) and multiplied in with one fused multiply-add
//! per input, in input order, so every level gives the same bits.
//!
//! Layout: panels of [`PANEL`] = 16 output features, `[panel][input][feature]`, so one 32-byte
//! load holds one input's weight for all 16 features of a panel. The last panel is padded
//! with zeros.

use std::ops::Range;

use rayon::prelude::*;

use crate::level::Level;
use crate::PANEL;

/// f32 to bf16, rounding to nearest even (NaN stays NaN).
pub fn bf16_from_f32(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// bf16 to f32 (exact).
pub fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

/// A `[n, k]` bf16 weight (`n` output features of `k` inputs) in the kernels' layout.
#[derive(Clone)]
pub struct Bf16Matrix {
    n: usize,
    k: usize,
    data: Vec<u16>,
}

impl std::fmt::Debug for Bf16Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Matrix([{}, {}])", self.n, self.k)
    }
}

impl Bf16Matrix {
    /// Repacks a row-major `[n, k]` matrix of bf16 bit patterns.
    pub fn from_bf16(bits: &[u16], n: usize, k: usize) -> Result<Self, String> {
        if n == 0 || k == 0 {
            return Err(format!(
                "a bf16 matrix needs a positive shape, got [{n}, {k}]"
            ));
        }
        if bits.len() != n * k {
            return Err(format!(
                "a [{n}, {k}] bf16 matrix takes {} values, got {}",
                n * k,
                bits.len()
            ));
        }
        let mut data = vec![0u16; n.div_ceil(PANEL) * PANEL * k];
        data.par_chunks_mut(PANEL * k)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let row = &bits[(p * PANEL + c) * k..][..k];
                    for (i, &v) in row.iter().enumerate() {
                        panel[i * PANEL + c] = v;
                    }
                }
            });
        Ok(Self { n, k, data })
    }

    /// Rounds a row-major `[n, k]` f32 matrix to bf16 and repacks it.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Result<Self, String> {
        let bits: Vec<u16> = w.par_iter().map(|&v| bf16_from_f32(v)).collect();
        Self::from_bf16(&bits, n, k)
    }

    /// The matrix back as row-major bf16 bit patterns.
    pub fn to_bf16(&self) -> Vec<u16> {
        let mut out = vec![0u16; self.n * self.k];
        for (row, dst) in out.chunks_exact_mut(self.k).enumerate() {
            let panel = &self.data[row / PANEL * PANEL * self.k..][..PANEL * self.k];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = panel[i * PANEL + row % PANEL];
            }
        }
        out
    }

    /// Several matrices with one `k` stacked along their outputs (q/k/v, gate/up).
    pub fn stack(parts: &[&Bf16Matrix]) -> Result<Self, String> {
        let first = parts.first().ok_or("nothing to stack")?;
        if parts.iter().any(|p| p.k != first.k) {
            return Err("stacked matrices must share k".to_string());
        }
        let n = parts.iter().map(|p| p.n).sum();
        let bits: Vec<u16> = parts.iter().flat_map(|p| p.to_bf16()).collect();
        Self::from_bf16(&bits, n, first.k)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the weight holds.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// `out[r][o] = Σ_i x[r][i] · w[o][i]` for the `rows` rows of row-major `x: [rows, k]`;
    /// `out` is row-major `[rows, n]`. Runs at `level` (lowered to what the CPU has) on the
    /// current rayon pool; every level gives the same bits.
    pub fn matmul(&self, x: &[f32], rows: usize, level: Level, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), rows * k, "activation size");
        assert_eq!(out.len(), rows * n, "output size");
        if rows == 0 {
            return;
        }
        let level = level.capped();
        crate::packed::for_each_tile(rows, n, out, |p, rows, tile| {
            let panel = &self.data[p * PANEL * k..][..PANEL * k];
            run_panel(level, panel, x, k, rows, tile)
        });
    }

    /// Whether the matrix can be read as a gate projection stacked on an up projection by
    /// [`Bf16Matrix::matmul_silu_mul`]: two halves of whole panels.
    pub fn splits_into_gate_up(&self) -> bool {
        self.n.is_multiple_of(2 * PANEL)
    }

    /// As [`crate::PackedMatrix::matmul_silu_mul`]: `SiLU(gate) · up` of the two halves of
    /// this matrix's product, into row-major `out: [rows, n / 2]`, the same bits as
    /// [`Bf16Matrix::matmul`] followed by [`crate::silu_mul`] at `level`.
    pub fn matmul_silu_mul(&self, x: &[f32], rows: usize, level: Level, out: &mut [f32]) {
        let k = self.k;
        assert_eq!(x.len(), rows * k, "activation size");
        assert!(
            self.splits_into_gate_up(),
            "{} features do not split into gate and up",
            self.n
        );
        let level = level.capped();
        crate::packed::for_each_gated_tile(rows, self.n / 2, level, out, |p, rows, tile| {
            let panel = &self.data[p * PANEL * k..][..PANEL * k];
            run_panel(level, panel, x, k, rows, tile)
        });
    }
}

/// One panel against `rows` of `x` at `level`, into `out` (a row of 16 per activation row).
fn run_panel(
    level: Level,
    panel: &[u16],
    x: &[f32],
    k: usize,
    rows: Range<usize>,
    out: &mut [[f32; PANEL]],
) {
    debug_assert_eq!(panel.len(), PANEL * k);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::capped` only yields levels the CPU was detected to run.
        Level::Avx512 => unsafe { crate::x86::dense::panel_avx512(panel, x, k, rows, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { crate::x86::dense::panel_avx2(panel, x, k, rows, out) },
        _ => scalar_panel(panel, x, k, rows, out),
    }
}

/// The portable twin: per output, one fused multiply-add per input, in input order.
fn scalar_panel(panel: &[u16], x: &[f32], k: usize, rows: Range<usize>, out: &mut [[f32; PANEL]]) {
    for (acc, r) in out.iter_mut().zip(rows) {
        let xr = &x[r * k..(r + 1) * k];
        *acc = [0.0; PANEL];
        for (i, &a) in xr.iter().enumerate() {
            let w = &panel[i * PANEL..(i + 1) * PANEL];
            for (acc, &w) in acc.iter_mut().zip(w) {
                *acc = bf16_to_f32(w).mul_add(a, *acc);
            }
        }
    }
}
