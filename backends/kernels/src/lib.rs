//! wick's CPU kernels: plain slices in, plain slices out, no tensors.
//!
//! - [`PackedMatrix`]: a quantized weight (Q8_0, Q4_0/Q4_1, Q5_0/Q5_1, Q4_K/Q5_K/Q6_K as GGUF
//!   stores them, any `k` that is a multiple of the block, any number of outputs) repacked at
//!   load into panels of 16 outputs.
//! - [`Bf16Matrix`]: a bf16 weight kept in bf16 (half an f32 copy's memory and traffic),
//!   computed in f32 with one fused multiply-add per input.
//! - [`QuantizedRows`]: the step's activations quantized once to 8-bit blocks, shared by every
//!   matrix that reads them; a block holding an outlier also carries its rounding error as a
//!   second 8-bit block, which the kernels add after the row's first pass.
//! - [`PackedMatrix::matmul`]: one code path for one row (decode) and many (batches, prefill):
//!   each panel stays in cache while all rows sweep over it, so a weight byte is read from
//!   memory once per step whatever the batch.
//! - [`attend`]: decode attention of the query heads that share a KV head, over a paged KV
//!   cache (f16, bf16, f32 or q8_0; head-major blocks) read in place through the block table.
//! - [`attend_chunk`]: prefill attention of a sequence's chunk of tokens over their causal
//!   windows of the same cache, in place, 16 tokens per tile with an online softmax.
//! - [`silu_mul`]: the MLP's `SiLU(gate) · up`, on the attention's `exp`.
//! - [`Level`]: AVX-512 VNNI, AVX2 or scalar, detected at run time and capped by the caller;
//!   every level returns the same bits, checked by the tests on every level the host runs.

mod activation;
mod attention;
mod convert;
mod dense;
mod elementwise;
pub mod format;
mod level;
mod memory;
mod packed;
mod prefill;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::{Outliers, QuantizedRows, OUTLIER_RATIO};
pub use attention::{
    attend, AttendScratch, HeadGroup, KvDtype, KvElement, KvLayout, PagedKv, Q8Block,
    ATTEND_PARTITION, Q8_VALUES,
};
pub use dense::{bf16_from_f32, bf16_to_f32, Bf16Matrix};
pub use elementwise::{add_rms_norm, silu_mul};
pub use format::{Format, BLOCK};
pub use level::{cpu_features, cpu_model, present_cpu_features, Level};
pub use memory::KvBuffer;
pub use packed::{PackedMatrix, PANEL};
pub use prefill::{attend_chunk, ChunkQueries, ChunkScratch, TILE as CHUNK_TILE};

#[cfg(test)]
mod tests;
