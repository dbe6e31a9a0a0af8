//! Linear layers: dense (f32/f16) or quantized (candle `QMatMul`). Activations are always f32.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

/// `y = x · Wᵀ (+ b)` for a packed activation `x: [tokens, in]`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `weight: [out, in]` in f32 or f16.
    Dense {
        weight: Tensor,
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
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Linear::Dense { weight, bias } => {
                let y = if weight.dtype() == DType::F32 {
                    x.matmul(&weight.t()?)?
                } else {
                    x.to_dtype(weight.dtype())?
                        .matmul(&weight.t()?)?
                        .to_dtype(DType::F32)?
                };
                (y, bias)
            }
            Linear::Quantized { weight, bias } => (weight.forward(x)?, bias),
            Linear::Hybrid {
                quantized,
                dense,
                min_rows,
                bias,
            } => {
                if x.dims().first().copied().unwrap_or(0) >= *min_rows {
                    (x.matmul(&dense.t()?)?, bias)
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

    /// Output features.
    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dims()[0],
            Linear::Hybrid { dense, .. } => dense.dims()[0],
            Linear::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
        }
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
        let expected = many.matmul(&dense.t().unwrap()).unwrap();
        assert!(same(&hybrid.forward(&many).unwrap(), &expected));
        // The two paths differ (the quantized one rounds activations), so dispatch is observable.
        assert!(!same(&quantized.forward(&many).unwrap(), &expected));
        assert_eq!(hybrid.out_dim(), 32);
    }
}
