//! Linear layers: dense (f32/f16) or quantized (candle `QMatMul`). Activations are always f32.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

/// `y = x · Wᵀ (+ b)` for a packed activation `x: [tokens, in]`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// `weight: [out, in]` in f32 or f16.
    Dense { weight: Tensor, bias: Option<Tensor> },
    Quantized { weight: QMatMul, bias: Option<Tensor> },
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
            Linear::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
        }
    }
}
