//! Every format and level against a dequantize-then-f64 reference on odd shapes and tails, and
//! every SIMD level against its scalar twin bit for bit.

use crate::format::{dequantize, quantize};
use crate::{Format, Level, PackedMatrix, QuantizedRows};

/// xorshift64*: deterministic test data without a dependency (every test module's).
pub(crate) struct Rng(pub(crate) u64);

/// Whether two results are the same floats bit for bit (how a SIMD level must match its
/// scalar twin).
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

impl Rng {
    /// Uniform in [-1, 1).
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }

    /// Roughly normal, with a few large values, as real weights and activations have.
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let v = (self.next() + self.next() + self.next()) * scale;
                if i % 97 == 5 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }
}

struct Case {
    format: Format,
    n: usize,
    k: usize,
    m: usize,
}

/// Runs `case` at every level the host has and checks each against the references; returns
/// the scalar output and how many activation blocks were refined (had an outlier).
fn check(case: &Case, seed: u64) -> (Vec<f32>, usize) {
    let Case { format, n, k, m } = *case;
    let mut rng = Rng(seed | 1);
    let w = rng.vec(n * k, 0.05);
    let x = rng.vec(m * k, 1.0);
    let stored = quantize(format, &w, n, k);
    let wd = dequantize(format, &stored, n, k);
    let packed = PackedMatrix::from_ggml(format, &stored, n, k).unwrap();
    let xq = QuantizedRows::quantize(&x, m, k);
    let mut scalar = vec![f32::NAN; m * n];
    packed.matmul(&xq, Level::Scalar, &mut scalar);
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let xqr = xq.dequantized_row(r);
        for o in 0..n {
            let wr = &wd[o * k..(o + 1) * k];
            let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
            let on_q: f64 = xqr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
            let magnitude: f64 = xqr
                .iter()
                .zip(wr)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            // Activation rounding: at most half a step (amax/127/2) per element.
            let rounding: f64 = xr
                .chunks(32)
                .zip(wr.chunks(32))
                .map(|(xb, wb)| {
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    amax / 254.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                })
                .sum();
            let float = 4e-5 * magnitude + 1e-6;
            let got = scalar[r * n + o] as f64;
            assert!(
                (got - on_q).abs() <= float,
                "{format:?} [{m}x{k}]·[{n}x{k}]ᵀ at ({r},{o}): {got} vs {on_q} (bound {float})"
            );
            assert!(
                (got - exact).abs() <= rounding * 1.001 + float,
                "{format:?} [{m}x{k}]·[{n}x{k}]ᵀ at ({r},{o}): {got} vs f32 {exact}"
            );
        }
    }
    for level in Level::supported() {
        let mut got = vec![f32::NAN; m * n];
        packed.matmul(&xq, level, &mut got);
        let same = same_bits(&got, &scalar);
        assert!(
            same,
            "{format:?} [{m}x{k}]·[{n}x{k}]ᵀ: {level} differs from scalar"
        );
    }
    (scalar, xq.refined_blocks())
}

#[test]
fn every_format_and_level_on_odd_shapes() {
    let mut seed = 7;
    let mut refined = 0;
    for format in Format::ALL {
        let shapes: &[(usize, usize)] = if format.block_elems() == 32 {
            &[(1, 32), (17, 64), (33, 576), (16, 2048), (40, 96)]
        } else {
            &[(1, 256), (17, 512), (33, 768), (16, 2048)]
        };
        for &(n, k) in shapes {
            for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33] {
                seed += 1;
                refined += check(&Case { format, n, k, m }, seed).1;
            }
        }
    }
    // The data's outliers (one value in 97 at 8×) make some blocks take the second pass, in
    // tiles with and without such rows.
    assert!(refined > 100, "{refined} refined blocks");
}

#[test]
fn long_rows_and_many_rows() {
    for format in Format::ALL {
        check(
            &Case {
                format,
                n: 19,
                k: 8192,
                m: 3,
            },
            11,
        );
        check(
            &Case {
                format,
                n: 70,
                k: 768,
                m: 64,
            },
            12,
        );
        // More rows than one task sweeps (64), with a tail.
        check(
            &Case {
                format,
                n: 48,
                k: 256,
                m: 130,
            },
            13,
        );
    }
}

#[test]
fn a_row_does_not_depend_on_the_other_rows() {
    for format in Format::ALL {
        let (n, k) = (37, 512);
        let mut rng = Rng(99);
        let stored = quantize(format, &rng.vec(n * k, 0.05), n, k);
        let packed = PackedMatrix::from_ggml(format, &stored, n, k).unwrap();
        let x = rng.vec(20 * k, 1.0);
        let mut all = vec![0f32; 20 * n];
        packed.matmul(
            &QuantizedRows::quantize(&x, 20, k),
            Level::detected(),
            &mut all,
        );
        for r in [0, 7, 19] {
            let mut one = vec![0f32; n];
            let row = QuantizedRows::quantize(&x[r * k..(r + 1) * k], 1, k);
            packed.matmul(&row, Level::detected(), &mut one);
            assert_eq!(one, all[r * n..(r + 1) * n], "{format:?} row {r}");
        }
    }
}

#[test]
fn stacked_matrices_equal_their_parts() {
    let k = 64;
    let mut rng = Rng(5);
    let parts: Vec<(Vec<u8>, usize)> = [24, 8, 8]
        .iter()
        .map(|&n| (quantize(Format::Q4_1, &rng.vec(n * k, 0.05), n, k), n))
        .collect();
    let refs: Vec<(&[u8], usize)> = parts.iter().map(|(b, n)| (b.as_slice(), *n)).collect();
    let stacked = PackedMatrix::from_ggml_stacked(Format::Q4_1, &refs, k).unwrap();
    assert_eq!(stacked.n(), 40);
    let x = QuantizedRows::quantize(&rng.vec(3 * k, 1.0), 3, k);
    let mut all = vec![0f32; 3 * 40];
    stacked.matmul(&x, Level::detected(), &mut all);
    let mut col = 0;
    for (bytes, n) in &parts {
        let one = PackedMatrix::from_ggml(Format::Q4_1, bytes, *n, k).unwrap();
        let mut y = vec![0f32; 3 * n];
        one.matmul(&x, Level::detected(), &mut y);
        for r in 0..3 {
            assert_eq!(y[r * n..(r + 1) * n], all[r * 40 + col..r * 40 + col + n]);
        }
        col += n;
    }
}

#[test]
fn packing_round_trips_and_stacks_by_panels_or_rows() {
    let k = 512;
    let mut rng = Rng(17);
    for format in Format::ALL {
        let sizes = [[32, 16, 16], [20, 7, 7]];
        for sizes in sizes {
            let stored: Vec<Vec<u8>> = sizes
                .iter()
                .map(|&n| quantize(format, &rng.vec(n * k, 0.05), n, k))
                .collect();
            let packed: Vec<PackedMatrix> = stored
                .iter()
                .zip(sizes)
                .map(|(b, n)| PackedMatrix::from_ggml(format, b, n, k).unwrap())
                .collect();
            for (p, b) in packed.iter().zip(&stored) {
                assert_eq!(&p.to_ggml(), b, "{format:?}");
            }
            let refs: Vec<&PackedMatrix> = packed.iter().collect();
            let stacked = PackedMatrix::stack(&refs).unwrap();
            assert_eq!(stacked.to_ggml(), stored.concat(), "{format:?} {sizes:?}");
        }
    }
}

#[test]
fn bad_shapes_are_refused() {
    let e = PackedMatrix::from_ggml(Format::Q8_0, &[0; 34], 1, 48).unwrap_err();
    assert!(e.contains("multiple of 32"), "{e}");
    let e = PackedMatrix::from_ggml(Format::Q4_0, &[0; 17], 1, 32).unwrap_err();
    assert!(e.contains("takes 18 bytes"), "{e}");
    let e = PackedMatrix::from_ggml(Format::Q4K, &[0; 144], 1, 128).unwrap_err();
    assert!(e.contains("multiple of 256"), "{e}");
}

#[test]
fn bf16_rounds_to_nearest_even() {
    use crate::{bf16_from_f32, bf16_to_f32};
    assert_eq!(bf16_from_f32(1.0), 0x3f80);
    // 1 + 2⁻⁸ is halfway between two bf16 values: to the even one (1.0).
    assert_eq!(bf16_from_f32(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(bf16_from_f32(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(bf16_to_f32(0xc040), -3.0);
    assert!(bf16_to_f32(bf16_from_f32(f32::NAN)).is_nan());
    assert_eq!(bf16_from_f32(f32::INFINITY), 0x7f80);
}

#[test]
fn bf16_every_level_on_odd_shapes() {
    use crate::{bf16_to_f32, Bf16Matrix};
    let mut seed = 40;
    for &(n, k) in &[(1, 1), (17, 7), (33, 576), (16, 2048), (40, 96), (5, 8192)] {
        for m in [1, 2, 3, 5, 8, 9, 17, 65] {
            seed += 1;
            let mut rng = Rng(seed);
            let w = rng.vec(n * k, 0.05);
            let x = rng.vec(m * k, 1.0);
            let packed = Bf16Matrix::from_f32(&w, n, k).unwrap();
            let wb: Vec<f32> = packed.to_bf16().iter().map(|&v| bf16_to_f32(v)).collect();
            let mut scalar = vec![f32::NAN; m * n];
            packed.matmul(&x, m, Level::Scalar, &mut scalar);
            for r in 0..m {
                for o in 0..n {
                    let (xr, wr) = (&x[r * k..(r + 1) * k], &wb[o * k..(o + 1) * k]);
                    let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let magnitude: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    // One f32 rounding per input, in a chain of k.
                    let bound = magnitude * k as f64 * 6e-8 + 1e-7;
                    let got = scalar[r * n + o] as f64;
                    assert!(
                        (got - exact).abs() <= bound,
                        "bf16 [{m}x{k}]·[{n}x{k}]ᵀ at ({r},{o}): {got} vs {exact}"
                    );
                    // bf16 rounding of the weights: at most 2⁻⁹ of each.
                    let from_f32: f64 = xr
                        .iter()
                        .zip(&w[o * k..(o + 1) * k])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    assert!((got - from_f32).abs() <= magnitude / 256.0 + bound);
                }
            }
            for level in Level::supported() {
                let mut got = vec![f32::NAN; m * n];
                packed.matmul(&x, m, level, &mut got);
                let same = same_bits(&got, &scalar);
                assert!(
                    same,
                    "bf16 [{m}x{k}]·[{n}x{k}]ᵀ: {level} differs from scalar"
                );
            }
        }
    }
}

#[test]
fn bf16_round_trips_stacks_and_rows_stand_alone() {
    use crate::Bf16Matrix;
    let k = 40;
    let mut rng = Rng(3);
    let parts: Vec<Bf16Matrix> = [20, 7, 16]
        .iter()
        .map(|&n| Bf16Matrix::from_f32(&rng.vec(n * k, 0.1), n, k).unwrap())
        .collect();
    let refs: Vec<&Bf16Matrix> = parts.iter().collect();
    let stacked = Bf16Matrix::stack(&refs).unwrap();
    assert_eq!(stacked.n(), 43);
    let joined: Vec<u16> = parts.iter().flat_map(|p| p.to_bf16()).collect();
    assert_eq!(stacked.to_bf16(), joined);
    assert_eq!(
        Bf16Matrix::from_bf16(&joined, 43, k).unwrap().to_bf16(),
        joined
    );
    let x = rng.vec(9 * k, 1.0);
    let mut all = vec![0f32; 9 * 43];
    stacked.matmul(&x, 9, Level::detected(), &mut all);
    for r in [0, 4, 8] {
        let mut one = vec![0f32; 43];
        stacked.matmul(&x[r * k..(r + 1) * k], 1, Level::detected(), &mut one);
        assert_eq!(one, all[r * 43..(r + 1) * 43], "row {r}");
    }
    let e = Bf16Matrix::from_bf16(&[0; 5], 2, 3).unwrap_err();
    assert!(e.contains("takes 6 values"), "{e}");
}

/// `SiLU(gate) · up` of the two halves of `product` (`[m, 2·width]`), the unfused way.
fn silu_mul_of(product: &[f32], m: usize, width: usize, level: Level) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * width];
    for (o, y) in out
        .chunks_exact_mut(width)
        .zip(product.chunks_exact(2 * width))
    {
        let (gate, up) = y.split_at(width);
        crate::silu_mul(level, gate, up, o);
    }
    out
}

#[test]
fn gate_up_products_fused_with_silu_give_the_unfused_bits() {
    use crate::Bf16Matrix;
    let mut rng = Rng(23);
    // Row counts across the kernels' row tiles and the 64-row task chunks; widths of one and
    // of several panels.
    for (width, k) in [(16, 64), (48, 256), (80, 512)] {
        let n = 2 * width;
        let w = rng.vec(n * k, 0.05);
        for m in [1, 3, 8, 13, 64, 65, 130] {
            let x = rng.vec(m * k, 1.0);
            let xq = QuantizedRows::quantize(&x, m, k);
            for format in Format::ALL {
                if !k.is_multiple_of(format.block_elems()) {
                    continue;
                }
                let stored = quantize(format, &w, n, k);
                let packed = PackedMatrix::from_ggml(format, &stored, n, k).unwrap();
                assert!(packed.splits_into_gate_up());
                for level in Level::supported() {
                    let mut product = vec![f32::NAN; m * n];
                    packed.matmul(&xq, level, &mut product);
                    let want = silu_mul_of(&product, m, width, level);
                    let mut got = vec![f32::NAN; m * width];
                    packed.matmul_silu_mul(&xq, level, &mut got);
                    assert!(
                        same_bits(&got, &want),
                        "{format:?} {level}: [{m}x{k}]·[{n}x{k}]ᵀ"
                    );
                }
            }
            let dense = Bf16Matrix::from_f32(&w, n, k).unwrap();
            assert!(dense.splits_into_gate_up());
            for level in Level::supported() {
                let mut product = vec![f32::NAN; m * n];
                dense.matmul(&x, m, level, &mut product);
                let want = silu_mul_of(&product, m, width, level);
                let mut got = vec![f32::NAN; m * width];
                dense.matmul_silu_mul(&x, m, level, &mut got);
                assert!(same_bits(&got, &want), "bf16 {level}: [{m}x{k}]·[{n}x{k}]ᵀ");
            }
        }
    }
    // Halves that are not whole panels cannot be split.
    let w = rng.vec(40 * 64, 0.05);
    let stored = quantize(Format::Q8_0, &w, 40, 64);
    let packed = PackedMatrix::from_ggml(Format::Q8_0, &stored, 40, 64).unwrap();
    assert!(!packed.splits_into_gate_up());
    assert!(!Bf16Matrix::from_f32(&w, 40, 64)
        .unwrap()
        .splits_into_gate_up());
}
