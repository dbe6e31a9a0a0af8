//! One decoder layer's weights: the fused projections (q/k/v, gate/up) and the MLP.

use candle_core::{Result, Tensor};

use crate::linear::{host_f32, Linear};

/// One decoder layer's weights.
pub(super) struct DecoderLayer {
    pub(super) input_layernorm: Tensor,
    /// q, k and v projections.
    pub(super) qkv: Projections,
    pub(super) o_proj: Linear,
    /// o_proj's bias, added once after the sum over ranks.
    pub(super) o_bias: Option<Tensor>,
    /// Per-head RMS norm weights on q and k (Qwen3).
    pub(super) q_norm: Option<Tensor>,
    pub(super) k_norm: Option<Tensor>,
    pub(super) post_attention_layernorm: Tensor,
    /// gate and up projections.
    pub(super) gate_up: Projections,
    pub(super) down_proj: Linear,
}

/// The most bytes of gate/up output one MLP pass holds: glibc serves larger blocks with fresh
/// mappings (its mmap threshold cannot be raised past 32 MiB), which are page-faulted and
/// zeroed again in every layer, so a long prefill chunk goes through the MLP in row chunks.
pub(super) const MLP_CHUNK_BYTES: usize = 16 << 20;

impl DecoderLayer {
    /// Whether o_proj and the MLP give a row the same bits in any subset of the step's rows.
    pub(super) fn tail_rows_independent(&self) -> bool {
        let mut linears = self.gate_up.linears();
        linears.extend([&self.o_proj, &self.down_proj]);
        linears.into_iter().all(Linear::rows_independent)
    }

    /// `down(SiLU(gate(h)) · up(h))`, over row chunks whose gate/up output stays below
    /// [`MLP_CHUNK_BYTES`] (each row's result is the same whatever the chunk).
    pub(super) fn mlp(&self, h: &Tensor, level: wick_kernels::Level) -> Result<Tensor> {
        // Whole kernel tiles (64 rows) per chunk.
        let chunk = (MLP_CHUNK_BYTES / (4 * self.gate_up.out_dim().max(1)) / 64 * 64).max(64);
        self.mlp_in_chunks(h, level, chunk)
    }

    pub(super) fn mlp_in_chunks(
        &self,
        h: &Tensor,
        level: wick_kernels::Level,
        chunk: usize,
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let pass = |x: &Tensor| self.down_proj.forward(&self.gate_up.silu_mul(x, level)?);
        if rows <= chunk {
            return pass(h);
        }
        let parts = (0..rows)
            .step_by(chunk)
            .map(|start| pass(&h.narrow(0, start, chunk.min(rows - start))?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// Linear layers that read the same input: one stacked layer when their weights allow it (the
/// input is then quantized once and read by one pass), else each on its own.
pub(super) enum Projections {
    Stacked { linear: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    pub(super) fn new(parts: Vec<Linear>) -> Result<Self> {
        let widths = parts.iter().map(Linear::out_dim).collect();
        Ok(match Linear::stack(&parts)? {
            Some(linear) => Projections::Stacked { linear, widths },
            None => Projections::Separate(parts),
        })
    }

    /// Each layer's output `[tokens, out_i]`, in order.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Projections::Stacked { linear, widths } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, start, w)?.contiguous();
                        start += w;
                        part
                    })
                    .collect()
            }
        }
    }

    /// `SiLU(gate) · up` for gate/up projections, in one pass over the stacked output when
    /// they are stacked.
    pub(super) fn silu_mul(&self, x: &Tensor, level: wick_kernels::Level) -> Result<Tensor> {
        let (linear, width) = match self {
            Projections::Stacked { linear, widths }
                if widths.len() == 2 && widths[0] == widths[1] =>
            {
                (linear, widths[0])
            }
            _ => {
                let [gate, up]: [Tensor; 2] = self
                    .forward(x)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("gate/up projections".to_string()))?;
                return candle_nn::ops::silu(&gate)? * up;
            }
        };
        if let Some(y) = linear.forward_silu_mul(x)? {
            return Ok(y);
        }
        let y = linear.forward(x)?.contiguous()?;
        let rows = y.dim(0)?;
        let mut out = vec![0f32; rows * width];
        {
            let (storage, layout) = y.storage_and_layout();
            let y = host_f32(&storage, layout)?;
            use rayon::prelude::*;
            out.par_chunks_mut(width)
                .zip(y.par_chunks(2 * width))
                .for_each(|(o, y)| {
                    let (gate, up) = y.split_at(width);
                    wick_kernels::silu_mul(level, gate, up, o);
                });
        }
        Tensor::from_vec(out, (rows, width), x.device())
    }

    /// The one stacked layer and each part's width, when the layers are stacked.
    pub(super) fn stacked(&self) -> Option<(&Linear, &[usize])> {
        match self {
            Projections::Stacked { linear, widths } => Some((linear, widths)),
            Projections::Separate(_) => None,
        }
    }

    /// Output features of all the layers together.
    pub(super) fn out_dim(&self) -> usize {
        match self {
            Projections::Stacked { widths, .. } => widths.iter().sum(),
            Projections::Separate(parts) => parts.iter().map(Linear::out_dim).sum(),
        }
    }

    pub(super) fn linears(&self) -> Vec<&Linear> {
        match self {
            Projections::Stacked { linear, .. } => vec![linear],
            Projections::Separate(parts) => parts.iter().collect(),
        }
    }
}
