//! Linear layers: dense (f32/f16 on candle, bf16 on wick's kernels), quantized on wick's own
//! kernels (`wick-kernels`: Q8_0, Q4_x, Q5_x, Q4_K/Q5_K/Q6_K, repacked at load), or quantized on
//! candle's `QMatMul` (the other GGUF types). Activations are always f32.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{bail, DType, Layout, Module, Result, Storage, Tensor};
use rayon::prelude::*;
use wick_kernels::{Bf16Matrix, Level, Outliers, PackedMatrix, QuantizedRows};

/// Up to this many rows, f32 dense layers run [`gemv`] instead of candle's GEMM: the GEMM
/// packs the whole transposed weight on every call, which at one row costs more than the
/// product itself.
pub const GEMV_MAX_ROWS: usize = 4;

/// `y = x · Wᵀ (+ b)` for a packed activation `x: [tokens, in]`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `weight: [out, in]` in f32 or f16.
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// A weight in wick's kernel layout; the step's rows are quantized to 8-bit blocks and one
    /// pass over the weight serves all of them.
    Packed {
        weight: Arc<PackedMatrix>,
        level: Level,
        /// Whether activation blocks holding an outlier take a second 8-bit pass.
        outliers: Outliers,
        bias: Option<Tensor>,
    },
    /// A bf16 weight in wick's kernel layout, computed in f32 from the bf16 values.
    Bf16 {
        weight: Arc<Bf16Matrix>,
        level: Level,
        bias: Option<Tensor>,
    },
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
    /// A quantized weight whose CPU kernel does not speed up with more rows (candle's generic
    /// vec-dot path), with an f32 copy used by steps of at least `min_rows` tokens: batched
    /// steps then run as GEMMs, and prompts see the stored weights without activation
    /// quantization.
    Hybrid {
        quantized: QMatMul,
        dense: Tensor,
        min_rows: usize,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// Whether a row's result is the same bits whatever the other rows (wick's kernels); the
    /// dense f32 path switches from its GEMV to candle's GEMM past [`GEMV_MAX_ROWS`] rows, and
    /// candle's quantized kernels make no such promise.
    pub fn rows_independent(&self) -> bool {
        matches!(self, Linear::Packed { .. } | Linear::Bf16 { .. })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Linear::Dense { weight, bias } => {
                let y = if weight.dtype() == DType::F32 {
                    dense_f32(x, weight)?
                } else {
                    x.to_dtype(weight.dtype())?
                        .matmul(&weight.t()?)?
                        .to_dtype(DType::F32)?
                };
                (y, bias)
            }
            Linear::Packed {
                weight,
                level,
                outliers,
                bias,
            } => (packed(x, weight, *level, *outliers)?, bias),
            Linear::Bf16 {
                weight,
                level,
                bias,
            } => (bf16(x, weight, *level)?, bias),
            Linear::Quantized { weight, bias } => (weight.forward(x)?, bias),
            Linear::Hybrid {
                quantized,
                dense,
                min_rows,
                bias,
            } => {
                if x.dims().first().copied().unwrap_or(0) >= *min_rows {
                    (dense_f32(x, dense)?, bias)
                } else {
                    (quantized.forward(x)?, bias)
                }
            }
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// For a layer that stacks a gate projection on an up projection of the same width,
    /// `SiLU(gate) · up` (`[rows, out / 2]`) computed as the product's tiles come out (the
    /// product is never stored), where the kernel allows it: wick's packed and bf16 layouts,
    /// whole panels per half, no bias. The same bits as [`Linear::forward`] followed by
    /// [`wick_kernels::silu_mul`] at the layer's level. `None` where it does not apply.
    pub fn forward_silu_mul(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self {
            Linear::Packed {
                weight,
                level,
                outliers,
                bias: None,
            } if weight.splits_into_gate_up() => Some(packed_with(
                x,
                weight.k(),
                weight.n() / 2,
                *level,
                *outliers,
                |q, y| weight.matmul_silu_mul(q, *level, y),
            )?),
            Linear::Bf16 {
                weight,
                level,
                bias: None,
            } if weight.splits_into_gate_up() => {
                Some(bf16_with(x, weight.n() / 2, |x, rows, y| {
                    weight.matmul_silu_mul(x, rows, *level, y)
                })?)
            }
            _ => None,
        })
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dims()[0],
            Linear::Hybrid { dense, .. } => dense.dims()[0],
            Linear::Packed { weight, .. } => weight.n(),
            Linear::Bf16 { weight, .. } => weight.n(),
            Linear::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
        }
    }

    /// The format the weight is held in (`"q4_1"`, `"f32"`, ...).
    pub fn format_name(&self) -> &'static str {
        let qmatmul = |q: &QMatMul| match q {
            QMatMul::QTensor(q) => ggml_name(q.dtype()),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => dtype_name(t.dtype()),
        };
        match self {
            Linear::Dense { weight, .. } => dtype_name(weight.dtype()),
            Linear::Packed { weight, .. } => weight.format().name(),
            Linear::Bf16 { .. } => "bf16",
            Linear::Quantized { weight, .. } => qmatmul(weight),
            Linear::Hybrid { quantized, .. } => qmatmul(quantized),
        }
    }

    /// Where this layer computes, for logs: `"wick avx512"`, `"candle"`, `"dense f32"`, ...
    pub fn kernel(&self) -> String {
        match self {
            Linear::Dense { weight, .. } => format!("candle dense {}", dtype_name(weight.dtype())),
            Linear::Packed { level, .. } | Linear::Bf16 { level, .. } => format!("wick {level}"),
            Linear::Quantized { .. } => "candle".to_string(),
            Linear::Hybrid { .. } => "candle, with an f32 copy".to_string(),
        }
    }

    /// One layer computing several layers that read the same input (q/k/v, gate/up): their
    /// outputs side by side, in order. `None` when they cannot share one weight: different
    /// formats, candle's quantized weights, or biases on some parts only.
    pub fn stack(parts: &[Linear]) -> Result<Option<Linear>> {
        let biases: Option<Vec<Tensor>> = parts.iter().map(|p| p.bias().cloned()).collect();
        let bias = match biases {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None if parts.iter().all(|p| p.bias().is_none()) => None,
            None => return Ok(None),
        };
        let packed = all_of(parts, |p| match p {
            Linear::Packed {
                weight,
                level,
                outliers,
                ..
            } => Some((weight.as_ref(), (*level, *outliers))),
            _ => None,
        });
        if let Some((matrices, (level, outliers))) = packed {
            return Ok(PackedMatrix::stack(&matrices).ok().map(|m| Linear::Packed {
                weight: Arc::new(m),
                level,
                outliers,
                bias,
            }));
        }
        let bf16 = all_of(parts, |p| match p {
            Linear::Bf16 { weight, level, .. } => Some((weight.as_ref(), *level)),
            _ => None,
        });
        if let Some((matrices, level)) = bf16 {
            return Ok(Bf16Matrix::stack(&matrices).ok().map(|m| Linear::Bf16 {
                weight: Arc::new(m),
                level,
                bias,
            }));
        }
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match p {
                Linear::Dense { weight, .. } if weight.device().is_cpu() => Some(weight),
                _ => None,
            })
            .collect();
        Ok(match dense {
            Some(w) if w.iter().all(|t| t.dtype() == w[0].dtype()) => Some(Linear::Dense {
                weight: Tensor::cat(&w, 0)?,
                bias,
            }),
            _ => None,
        })
    }

    fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { bias, .. }
            | Linear::Packed { bias, .. }
            | Linear::Bf16 { bias, .. }
            | Linear::Quantized { bias, .. }
            | Linear::Hybrid { bias, .. } => bias.as_ref(),
        }
    }
}

/// Every part's wick-kernel weight as `pick` finds it, with the first part's settings (level,
/// ...); `None` when some part holds another kind of weight.
fn all_of<'a, M, S: Copy>(
    parts: &'a [Linear],
    pick: impl Fn(&'a Linear) -> Option<(&'a M, S)>,
) -> Option<(Vec<&'a M>, S)> {
    let picked: Vec<(&M, S)> = parts.iter().map(pick).collect::<Option<_>>()?;
    let settings = picked.first()?.1;
    Some((picked.into_iter().map(|(m, _)| m).collect(), settings))
}

thread_local! {
    /// The calling thread's activation buffers, reused from matmul to matmul: a prefill chunk's
    /// quantized rows are megabytes that would otherwise be freshly mapped (and page-faulted)
    /// four times per layer.
    static QUANTIZED: std::cell::Cell<QuantizedRows> = std::cell::Cell::new(QuantizedRows::default());
}

/// `x · Wᵀ` on wick's kernels: the rows are quantized once, then one pass over the weight.
fn packed(x: &Tensor, weight: &PackedMatrix, level: Level, outliers: Outliers) -> Result<Tensor> {
    packed_with(x, weight.k(), weight.n(), level, outliers, |q, y| {
        weight.matmul(q, level, y)
    })
}

/// The rows of `x` quantized (in this thread's reused buffer) and handed with an output of
/// `[rows, width]` to `product`.
fn packed_with(
    x: &Tensor,
    k: usize,
    width: usize,
    level: Level,
    outliers: Outliers,
    product: impl FnOnce(&QuantizedRows, &mut [f32]),
) -> Result<Tensor> {
    let rows = x.dims().first().copied().unwrap_or(0);
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; rows * width];
    // Taken out of the cell, not borrowed: nothing stays borrowed while the pool runs.
    let mut q = QUANTIZED.take();
    {
        let (xs, xl) = x.storage_and_layout();
        q.requantize(level, outliers, host_f32(&xs, xl)?, rows, k);
        product(&q, &mut y);
    }
    QUANTIZED.set(q);
    Tensor::from_vec(y, (rows, width), x.device())
}

/// `x · Wᵀ` on wick's bf16 kernels, from the f32 rows as they are.
fn bf16(x: &Tensor, weight: &Bf16Matrix, level: Level) -> Result<Tensor> {
    bf16_with(x, weight.n(), |x, rows, y| weight.matmul(x, rows, level, y))
}

/// The f32 rows of `x` handed with an output of `[rows, width]` to `product`.
fn bf16_with(
    x: &Tensor,
    width: usize,
    product: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let rows = x.dims().first().copied().unwrap_or(0);
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; rows * width];
    {
        let (xs, xl) = x.storage_and_layout();
        product(host_f32(&xs, xl)?, rows, &mut y);
    }
    Tensor::from_vec(y, (rows, width), x.device())
}

/// `x · Wᵀ` for f32 `x: [rows, in]` and `W: [out, in]`.
fn dense_f32(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let rows = x.dims().first().copied().unwrap_or(0);
    if rows == 0 || rows > GEMV_MAX_ROWS || !x.device().is_cpu() || !weight.is_contiguous() {
        return x.matmul(&weight.t()?);
    }
    let (out_dim, in_dim) = weight.dims2()?;
    let x = x.contiguous()?;
    let y = {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        gemv(
            host_f32(&xs, xl)?,
            host_f32(&ws, wl)?,
            rows,
            in_dim,
            out_dim,
        )
    };
    Tensor::from_vec(y, (rows, out_dim), x.device())
}

/// The f32 data of a contiguous tensor in host memory, without a copy.
pub(crate) fn host_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        bail!("expected a tensor in host memory");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("expected a contiguous tensor");
    };
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// `y[r][o] = Σ_i x[r][i] · w[o][i]` for a few rows: each weight row is read once, from
/// memory, for all rows of `x`; rows of the weight are split over the rayon pool.
pub fn gemv(x: &[f32], w: &[f32], rows: usize, in_dim: usize, out_dim: usize) -> Vec<f32> {
    const CHUNK: usize = 64;
    let mut yt = vec![0f32; out_dim * rows];
    yt.par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(c, out)| {
            let first = c * CHUNK;
            for (j, o) in out.chunks_exact_mut(rows).enumerate() {
                let wr = &w[(first + j) * in_dim..(first + j + 1) * in_dim];
                for (r, y) in o.iter_mut().enumerate() {
                    *y = dot(&x[r * in_dim..(r + 1) * in_dim], wr);
                }
            }
        });
    // `yt` is [out, rows]; the result is [rows, out].
    if rows == 1 {
        return yt;
    }
    let mut y = vec![0f32; rows * out_dim];
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * out_dim + o] = *v;
        }
    }
    y
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let off = i + 8 * k;
            *acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(off)),
                _mm256_loadu_ps(pb.add(off)),
                *acc,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Sixteen independent accumulators, so the loop vectorises and pipelines.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A candle dtype's short name, for messages.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        DType::U8 => "u8",
        DType::U32 => "u32",
        DType::I64 => "i64",
        _ => "other",
    }
}

/// llama.cpp's lower-case names of ggml types.
pub fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    fn ramp(rows: usize, cols: usize, phase: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.37 + phase).sin())
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn gemv_matches_candle_matmul() {
        for rows in 1..=GEMV_MAX_ROWS {
            let (w, x) = (ramp(200, 70, 0.5), ramp(rows, 70, 1.5));
            let expected = x.matmul(&w.t().unwrap()).unwrap();
            let dense = Linear::Dense {
                weight: w,
                bias: None,
            };
            let got = dense.forward(&x).unwrap();
            let d: f32 = (got - expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-4, "rows {rows}: {d}");
        }
    }

    #[test]
    fn hybrid_uses_the_dense_copy_from_min_rows_on() {
        let w = ramp(32, 64, 0.0);
        let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let quantized = QMatMul::from_qtensor(q).unwrap();
        let hybrid = Linear::Hybrid {
            quantized: quantized.clone(),
            dense: dense.clone(),
            min_rows: 4,
            bias: None,
        };
        let same = |a: &Tensor, b: &Tensor| {
            let d: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            d == 0.0
        };
        let few = ramp(3, 64, 1.0);
        assert!(same(
            &hybrid.forward(&few).unwrap(),
            &quantized.forward(&few).unwrap()
        ));
        let many = ramp(4, 64, 2.0);
        let expected = Linear::Dense {
            weight: dense.clone(),
            bias: None,
        }
        .forward(&many)
        .unwrap();
        assert!(same(&hybrid.forward(&many).unwrap(), &expected));
        // The two paths differ (the quantized one rounds activations), so dispatch is observable.
        assert!(!same(&quantized.forward(&many).unwrap(), &expected));
        assert_eq!(hybrid.out_dim(), 32);
    }
}
