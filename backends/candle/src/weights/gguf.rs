//! GGUF files: the tensor directory read on demand, llama.cpp's tensor names and its q/k row
//! order for Llama, metadata counts.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType};
use candle_core::{Device, Result};

use super::{err, GgufWeights, Stored};

impl GgufWeights {
    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the tensor with Hugging Face name `name`, with q/k rows put back in HF order.
    /// f32/f16/bf16 tensors come back dense so they take the same path as safetensors weights.
    pub(super) fn load(&self, name: &str) -> Result<Stored> {
        let gguf_name = gguf_tensor_name(name);
        let info = self
            .infos
            .get(&gguf_name)
            .ok_or_else(|| err(format!("missing tensor {name} (GGUF `{gguf_name}`)")))?;
        let dims = info.shape.dims().to_vec();
        let dtype = info.ggml_dtype;
        let size = tensor_bytes(&gguf_name, info).map_err(|e| err(e.to_string()))?;
        let mut bytes = vec![0u8; size];
        {
            let mut file = self
                .file
                .lock()
                .map_err(|_| err("GGUF reader lock poisoned".to_string()))?;
            file.seek(SeekFrom::Start(self.data_offset + info.offset))?;
            file.read_exact(&mut bytes).map_err(|e| {
                err(format!(
                    "reading GGUF tensor {gguf_name} from {}: {e}",
                    self.path.display()
                ))
            })?;
        }
        if let Some((heads, kv_heads)) = self.unpermute_heads {
            let n_head = if gguf_name.starts_with("blk.") && gguf_name.contains(".attn_q.") {
                Some(heads)
            } else if gguf_name.starts_with("blk.") && gguf_name.contains(".attn_k.") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(n_head) = n_head {
                bytes = unpermute_rows(&bytes, &dims, dtype, n_head)
                    .map_err(|e| err(format!("GGUF tensor {gguf_name}: {e}")))?;
            }
        }
        let q = ggml_file::qtensor_from_ggml(dtype, &bytes, dims, &Device::Cpu)?;
        match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                q.dequantize(&Device::Cpu).map(Stored::Dense)
            }
            _ => Ok(Stored::Quantized(q)),
        }
    }
}

/// The bytes tensor `name` takes in the file, checked: a corrupt shape fails here rather than
/// overflowing or sizing an allocation.
pub(super) fn tensor_bytes(name: &str, info: &gguf_file::TensorInfo) -> anyhow::Result<usize> {
    let dtype = info.ggml_dtype;
    let elems = info
        .shape
        .dims()
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            anyhow::anyhow!("GGUF tensor {name}: its shape {:?} overflows", info.shape)
        })?;
    if elems == 0 {
        // (Also keeps an empty buffer's dangling pointer away from candle's typed views.)
        anyhow::bail!(
            "GGUF tensor {name} has no elements (shape {:?})",
            info.shape
        );
    }
    if !elems.is_multiple_of(dtype.block_size()) {
        anyhow::bail!("GGUF tensor {name}: {elems} elements do not fill {dtype:?} blocks");
    }
    (elems / dtype.block_size())
        .checked_mul(dtype.type_size())
        .ok_or_else(|| anyhow::anyhow!("GGUF tensor {name}: its size overflows"))
}

/// For each Hugging Face row of a q or k projection, the GGUF row that holds it.
///
/// llama.cpp's converter (`LlamaModel.permute`) reorders the rows of each head from HF's
/// half-split rope layout to the interleaved one:
/// `w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2).reshape(w.shape)`, so HF row
/// `h·hd + s·hd/2 + j` (s ∈ {0,1}, j < hd/2) lands at GGUF row `h·hd + 2j + s`.
pub fn llama_cpp_unpermute_index(rows: usize, n_head: usize) -> anyhow::Result<Vec<usize>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        anyhow::bail!("{rows} rows cannot be split into {n_head} heads of even size");
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut src = Vec::with_capacity(rows);
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..half {
                src.push(h * head_dim + 2 * j + s);
            }
        }
    }
    Ok(src)
}

/// Reorders whole rows of a raw ggml tensor (`dims = [rows, cols]` or `[rows]`). Each row of a
/// 2-D tensor is an independent run of blocks, so quantized rows move as opaque bytes.
pub(super) fn unpermute_rows(
    bytes: &[u8],
    dims: &[usize],
    dtype: GgmlDType,
    n_head: usize,
) -> anyhow::Result<Vec<u8>> {
    let rows = dims[0];
    let per_row: usize = dims[1..].iter().product();
    if !per_row.is_multiple_of(dtype.block_size()) {
        anyhow::bail!("rows of {per_row} elements are not whole {dtype:?} blocks");
    }
    let row_bytes = per_row / dtype.block_size() * dtype.type_size();
    let src = llama_cpp_unpermute_index(rows, n_head)?;
    let mut out = Vec::with_capacity(bytes.len());
    for r in src {
        out.extend_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
    }
    Ok(out)
}

/// The llama.cpp name of a Hugging Face tensor name; names without a mapping pass through
/// (so GGUF-only tensors such as `rope_freqs.weight` can be asked for directly).
pub fn gguf_tensor_name(hf: &str) -> String {
    let (stem, suffix) = match hf.rsplit_once('.') {
        Some((stem, s @ ("weight" | "bias"))) => (stem, s),
        _ => return hf.to_string(),
    };
    let mapped = match stem {
        "model.embed_tokens" => Some("token_embd".to_string()),
        "model.norm" => Some("output_norm".to_string()),
        "lm_head" => Some("output".to_string()),
        _ => stem
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(layer, part)| {
                let gguf = match part {
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "self_attn.q_norm" => "attn_q_norm",
                    "self_attn.k_norm" => "attn_k_norm",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    _ => return None,
                };
                Some(format!("blk.{layer}.{gguf}"))
            }),
    };
    match mapped {
        Some(m) => format!("{m}.{suffix}"),
        None => hf.to_string(),
    }
}

/// A GGUF metadata count (an unsigned integer of any width).
pub(super) fn gguf_count(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x.into()),
        V::U16(x) => Some(x.into()),
        V::U32(x) => usize::try_from(x).ok(),
        V::U64(x) => usize::try_from(x).ok(),
        V::I8(x) => usize::try_from(x).ok(),
        V::I16(x) => usize::try_from(x).ok(),
        V::I32(x) => usize::try_from(x).ok(),
        V::I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}
