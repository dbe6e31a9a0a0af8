//! Where the decoder's tensors come from: in-memory tensors (tests), safetensors files (single or
//! sharded) or a GGUF file. The model asks for tensors by their Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`); a GGUF store maps those names to GGUF ones.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::linear::Linear;

/// A quantization applied at load time to dense (safetensors) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    Q8_0,
    Q4K,
}

/// How to build the model's layers.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dense compute dtype: F32 or F16 (bf16 checkpoints load as f32 on CPU).
    pub dtype: DType,
    pub quantize: Option<Quantize>,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            quantize: None,
            device: Device::Cpu,
        }
    }
}

pub enum WeightStore {
    /// Tensors held in memory, keyed by Hugging Face name.
    Tensors(HashMap<String, Tensor>),
}

impl WeightStore {
    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightStore::Tensors(map) => map.contains_key(name),
        }
    }

    /// A dense tensor in `dtype` (quantized tensors are dequantized).
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            WeightStore::Tensors(map) => map
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?
                .to_device(device)?
                .to_dtype(dtype),
        }
    }

    /// The linear layer `{prefix}.weight` (+ `{prefix}.bias` when `bias`), in the format the
    /// options choose: GGUF tensors stay as stored, dense ones are `opts.dtype` or quantized with
    /// `opts.quantize`.
    pub fn linear(&self, prefix: &str, bias: bool, opts: &LoadOptions) -> Result<Linear> {
        let weight = self.tensor(&format!("{prefix}.weight"), opts.dtype, &opts.device)?;
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), DType::F32, &opts.device)?)
        } else {
            None
        };
        Ok(Linear::Dense { weight, bias })
    }
}
