//! Where the decoder's tensors come from: in-memory tensors (tests), safetensors files (single or
//! sharded) or a GGUF file. The model asks for tensors by their Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`); a GGUF store maps those names to GGUF ones.
//!
//! Formats: dense checkpoints (f32/f16/bf16) load as `LoadOptions::dtype` (f32 or f16, never
//! bf16: it has no CPU matmul kernel) or, with `LoadOptions::quantize`, as quantized linears.
//! GGUF linears keep their stored quantization; norms and embeddings are dequantized to f32.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};

use wick_kernels::{Format, Level, Outliers, PackedMatrix};

use crate::linear::{dtype_name, ggml_name, Linear};

mod gguf;

use gguf::gguf_count;
pub use gguf::{gguf_tensor_name, llama_cpp_unpermute_index};

/// A quantization applied at load time to dense (safetensors) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    Q8_0,
    Q4_0,
    Q4K,
}

impl Quantize {
    /// The ggml block format this quantization writes.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4K => GgmlDType::Q4K,
        }
    }
}

/// The ggml types wick's own kernels compute (on the CPU, any shape); the others go to
/// candle's `QMatMul`.
pub fn kernel_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        GgmlDType::Q4_0 => Some(Format::Q4_0),
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q5_0 => Some(Format::Q5_0),
        GgmlDType::Q5_1 => Some(Format::Q5_1),
        GgmlDType::Q4K => Some(Format::Q4K),
        GgmlDType::Q5K => Some(Format::Q5K),
        GgmlDType::Q6K => Some(Format::Q6K),
        _ => None,
    }
}

/// How to build the model's layers.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dense compute dtype: F32, F16, or BF16 (dense linear weights held in bf16 on wick's
    /// kernels, CPU only; norms and embeddings f32).
    pub dtype: DType,
    pub quantize: Option<Quantize>,
    pub device: Device,
    /// Load quantized (GGUF) linear weights as dense `dtype` tensors instead.
    pub dequantize: bool,
    /// Quantized weights on candle's slow generic CPU path also get an f32 copy used by steps
    /// of at least this many tokens (see [`Linear::Hybrid`]); `None` = never.
    pub dense_copy_min_rows: Option<usize>,
    /// Those f32 copies are made only while all of them together fit in this many bytes.
    pub dense_copy_budget: usize,
    /// The highest instruction set wick's kernels may use (lowered to what the CPU has).
    pub kernel_level: Level,
    /// Whether the kernels give activation blocks holding an outlier a second 8-bit pass.
    pub activation_outliers: Outliers,
}

/// Steps of at least this many tokens use the f32 copy of a slow quantized weight. One: on
/// SmolLM2-135M Q4_1, candle's scalar Q4_1 kernel decodes at ~11 tokens/s where the f32 copy
/// through [`crate::linear::gemv`] gives ~19 (2 cores).
pub const DEFAULT_DENSE_COPY_MIN_ROWS: usize = 1;
/// Models whose slow quantized weights take more than this as f32 keep only the quantized form.
pub const DEFAULT_DENSE_COPY_BUDGET: usize = 2 << 30;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            quantize: None,
            device: Device::Cpu,
            dequantize: false,
            dense_copy_min_rows: Some(DEFAULT_DENSE_COPY_MIN_ROWS),
            dense_copy_budget: DEFAULT_DENSE_COPY_BUDGET,
            kernel_level: Level::detected(),
            activation_outliers: Outliers::default(),
        }
    }
}

impl LoadOptions {
    /// The dtype dense linear weights take: f16 when asked for, f32 otherwise (never bf16).
    fn dense_dtype(&self) -> DType {
        if self.dtype == DType::F16 {
            DType::F16
        } else {
            DType::F32
        }
    }

    /// The dtype dense linear weights compute in: `dtype`, where bf16 means wick's bf16
    /// kernels (CPU only; elsewhere f32).
    fn linear_dtype(&self) -> DType {
        if self.dtype == DType::BF16 && self.device.is_cpu() {
            DType::BF16
        } else {
            self.dense_dtype()
        }
    }
}

/// Which part of a tensor a tensor-parallel rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// These rows (output features of a linear weight, entries of a vector).
    Rows(Range<usize>),
    /// These columns (input features of a linear weight).
    Cols(Range<usize>),
}

/// A model's tensors by Hugging Face name, whatever file format holds them.
pub enum WeightStore {
    /// Tensors held in memory, keyed by Hugging Face name.
    Tensors(HashMap<String, Tensor>),
    /// Memory-mapped safetensors files (one, or the shards of an index), Hugging Face names.
    Safetensors(SafetensorsWeights),
    /// A GGUF file, read tensor by tensor; Hugging Face names are mapped to llama.cpp's.
    Gguf(GgufWeights),
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightStore::Tensors(map) => write!(f, "WeightStore::Tensors({} tensors)", map.len()),
            WeightStore::Safetensors(st) => {
                write!(f, "WeightStore::Safetensors({} tensors)", st.names.len())
            }
            WeightStore::Gguf(g) => write!(
                f,
                "WeightStore::Gguf({}, {} tensors)",
                g.path.display(),
                g.infos.len()
            ),
        }
    }
}

/// Safetensors files, memory-mapped.
pub struct SafetensorsWeights {
    files: MmapedSafetensors,
    names: HashSet<String>,
}

/// A GGUF file's tensor directory, read on demand.
pub struct GgufWeights {
    path: PathBuf,
    file: Mutex<File>,
    infos: HashMap<String, gguf_file::TensorInfo>,
    data_offset: u64,
    /// `(head_count, head_count_kv)` when the file's q/k rows are in llama.cpp's interleaved
    /// rope order and must be put back into Hugging Face's half-split order.
    unpermute_heads: Option<(usize, usize)>,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl WeightStore {
    /// Bytes that f32 copies of every quantized matrix on candle's slow CPU path would take.
    pub fn slow_quantized_f32_bytes(&self) -> usize {
        match self {
            WeightStore::Gguf(g) => g
                .infos
                .values()
                .filter(|i| {
                    let dims = i.shape.dims();
                    dims.len() == 2
                        && !matches!(
                            i.ggml_dtype,
                            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                        )
                        && !fast_cpu_kernel(i.ggml_dtype, dims)
                        && kernel_format(i.ggml_dtype).is_none()
                })
                .map(|i| i.shape.elem_count() * 4)
                .sum(),
            WeightStore::Tensors(_) | WeightStore::Safetensors(_) => 0,
        }
    }

    /// Memory-maps safetensors files (all shards of one checkpoint).
    pub fn from_safetensors(paths: &[PathBuf]) -> anyhow::Result<Self> {
        if paths.is_empty() {
            anyhow::bail!("no safetensors files to load");
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them
        // not being truncated or rewritten while the server runs.
        let files = unsafe {
            if paths.len() == 1 {
                MmapedSafetensors::new(&paths[0])
            } else {
                MmapedSafetensors::multi(paths)
            }
        }
        .with_context(|| format!("reading safetensors {}", paths[0].display()))?;
        let names = files.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(WeightStore::Safetensors(SafetensorsWeights {
            files,
            names,
        }))
    }

    /// Memory-maps the checkpoint in a Hugging Face model folder: the shards listed by
    /// `model.safetensors.index.json`, or `model.safetensors`.
    pub fn from_safetensors_dir(dir: &Path) -> anyhow::Result<Self> {
        Self::from_safetensors(&wick_model::source::safetensors_files(dir)?)
    }

    /// Opens a GGUF file; returns the store and the file's metadata (for the config and the
    /// tokenizer).
    pub fn from_gguf_file(path: &Path) -> anyhow::Result<(Self, gguf_file::Content)> {
        // wick's own reader first: it bounds every string, array and count by what the file
        // holds, so a corrupt header fails here instead of sizing an allocation in candle's.
        wick_model::gguf::Header::read_file(path)?;
        let mut file =
            File::open(path).with_context(|| format!("opening GGUF file {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("reading GGUF header of {}", path.display()))?;
        let file_len = file.metadata()?.len();
        for (name, info) in &content.tensor_infos {
            let size = gguf::tensor_bytes(name, info)? as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(size));
            if end.is_none_or(|end| end > file_len) {
                anyhow::bail!(
                    "GGUF tensor {name} ({size} bytes at offset {}) lies past the end of {} \
                     ({file_len} bytes): the file is truncated or corrupt",
                    info.offset,
                    path.display()
                );
            }
        }
        let infos = content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let copy = gguf_file::TensorInfo {
                    ggml_dtype: info.ggml_dtype,
                    shape: info.shape.clone(),
                    offset: info.offset,
                };
                (name.clone(), copy)
            })
            .collect();
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        // llama.cpp's converter interleaves the rope halves of q/k rows for the `llama`
        // architecture only (Mistral GGUFs are `llama` too); qwen2/qwen3 keep HF order.
        let unpermute_heads = if arch == "llama" {
            let count = |key: &str| {
                content
                    .metadata
                    .get(&format!("llama.attention.{key}"))
                    .and_then(gguf_count)
            };
            let heads = count("head_count").context("GGUF lacks llama.attention.head_count")?;
            Some((heads, count("head_count_kv").unwrap_or(heads)))
        } else {
            None
        };
        let store = WeightStore::Gguf(GgufWeights {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            infos,
            data_offset: content.tensor_data_offset,
            unpermute_heads,
        });
        Ok((store, content))
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightStore::Tensors(map) => map.contains_key(name),
            WeightStore::Safetensors(st) => st.names.contains(name),
            WeightStore::Gguf(g) => g.infos.contains_key(&gguf_tensor_name(name)),
        }
    }

    /// A dense tensor in `dtype` (quantized tensors are dequantized).
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.tensor_part(name, &Part::Whole, dtype, device)
    }

    /// `part` of a dense tensor in `dtype`.
    pub fn tensor_part(
        &self,
        name: &str,
        part: &Part,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.stored(name)?
            .part(part)
            .map_err(|e| err(format!("{name}: {e}")))?
            .into_dense()?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// The linear layer `{prefix}.weight` (+ `{prefix}.bias` when `bias`), in the format the
    /// options choose: GGUF tensors stay as stored, dense ones are `opts.dtype` or quantized with
    /// `opts.quantize`.
    pub fn linear(&self, prefix: &str, bias: bool, opts: &LoadOptions) -> Result<Linear> {
        self.linear_part(prefix, bias, &Part::Whole, opts)
    }

    /// `part` of the linear layer `{prefix}`: output rows (the bias is split with them) or
    /// input columns (a column part has no bias: the caller adds it once, after the sum over
    /// ranks). Quantized weights keep their format when the split falls on whole blocks.
    pub fn linear_part(
        &self,
        prefix: &str,
        bias: bool,
        part: &Part,
        opts: &LoadOptions,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let bias = match (bias, part) {
            (false, _) => None,
            (true, Part::Cols(_)) => {
                return Err(err(format!(
                    "{prefix}: a column part of a linear layer cannot carry its bias"
                )))
            }
            (true, _) => {
                Some(self.tensor_part(&format!("{prefix}.bias"), part, DType::F32, &opts.device)?)
            }
        };
        let stored = self
            .stored(&name)?
            .part(part)
            .map_err(|e| err(format!("{name}: {e}")))?;
        let dense = match stored {
            // Asked for dense weights, or for another quantization than the file's: go
            // through f32 and the dense path below (which quantizes when asked).
            Stored::Quantized(q)
                if opts.dequantize
                    || opts.quantize.is_some_and(|t| t.ggml_dtype() != q.dtype()) =>
            {
                q.dequantize(&Device::Cpu)?
            }
            Stored::Quantized(q) if on_wick_kernels(q.dtype(), opts) => {
                return packed_linear(&q, bias, opts);
            }
            Stored::Quantized(q) => {
                let q = if q.device().same_device(&opts.device) {
                    q
                } else {
                    let (dtype, dims, bytes) =
                        (q.dtype(), q.shape().dims().to_vec(), q.data()?.into_owned());
                    ggml_file::qtensor_from_ggml(dtype, &bytes, dims, &opts.device)?
                };
                let dense_copy = match opts.dense_copy_min_rows {
                    Some(min_rows)
                        if !has_fast_cpu_kernel(&q)
                            && self.slow_quantized_f32_bytes() <= opts.dense_copy_budget =>
                    {
                        Some((q.dequantize(&opts.device)?, min_rows))
                    }
                    _ => None,
                };
                let quantized = QMatMul::from_qtensor(q)?;
                return Ok(match dense_copy {
                    Some((dense, min_rows)) => Linear::Hybrid {
                        quantized,
                        dense,
                        min_rows,
                        bias,
                    },
                    None => Linear::Quantized {
                        weight: quantized,
                        bias,
                    },
                });
            }
            Stored::Dense(t) => t,
        };
        if let Some(quantize) = opts.quantize {
            let ggml = quantize.ggml_dtype();
            let in_dim = dense.dims().last().copied().unwrap_or(0);
            if dense.rank() == 2 && in_dim.is_multiple_of(ggml.block_size()) {
                let cpu = dense.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let q = QTensor::quantize_onto(&cpu, ggml, &opts.device)?;
                if on_wick_kernels(ggml, opts) {
                    return packed_linear(&q, bias, opts);
                }
                return Ok(Linear::Quantized {
                    weight: QMatMul::QTensor(std::sync::Arc::new(q)),
                    bias,
                });
            }
            tracing::warn!(
                tensor = name.as_str(),
                in_dim,
                block = ggml.block_size(),
                "in-dim is not a multiple of the quantization block; keeping this weight dense"
            );
        }
        if opts.linear_dtype() == DType::BF16 && dense.rank() == 2 {
            let (n, k) = dense.dims2()?;
            let w = dense
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let weight = wick_kernels::Bf16Matrix::from_f32(&w, n, k).map_err(err)?;
            return Ok(Linear::Bf16 {
                weight: std::sync::Arc::new(weight),
                level: opts.kernel_level,
                bias,
            });
        }
        let weight = dense
            .to_dtype(opts.dense_dtype())?
            .to_device(&opts.device)?;
        Ok(Linear::Dense { weight, bias })
    }

    /// The format most linear-weight elements are stored in (`"f32"`, `"bf16"`, `"q4_k"`, ...),
    /// as stored on disk; see [`WeightStore::compute_format`] for what the layers will run.
    pub fn weight_format(&self) -> String {
        let mut by_format: HashMap<String, usize> = HashMap::new();
        let mut add = |name: &str, format: String, dims: &[usize]| {
            if dims.len() == 2 && is_linear_weight(name) {
                *by_format.entry(format).or_default() += dims.iter().product::<usize>();
            }
        };
        match self {
            WeightStore::Tensors(map) => {
                for (name, t) in map {
                    add(name, dtype_name(t.dtype()).to_string(), t.dims());
                }
            }
            WeightStore::Safetensors(st) => {
                for (name, view) in st.files.tensors() {
                    let format = match DType::try_from(view.dtype()) {
                        Ok(dt) => dtype_name(dt).to_string(),
                        Err(_) => format!("{:?}", view.dtype()).to_lowercase(),
                    };
                    add(&name, format, view.shape());
                }
            }
            WeightStore::Gguf(g) => {
                for (name, info) in &g.infos {
                    add(
                        name,
                        ggml_name(info.ggml_dtype).to_string(),
                        info.shape.dims(),
                    );
                }
            }
        }
        by_format
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(format, _)| format)
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// The format linear layers will compute in under `opts`: a GGUF quantization as stored,
    /// else `opts.quantize`, else `opts.dtype` (bf16 never: it loads as f32).
    pub fn compute_format(&self, opts: &LoadOptions) -> String {
        let stored = self.weight_format();
        let dense = matches!(stored.as_str(), "f32" | "f16" | "bf16");
        match (dense, opts.quantize) {
            (false, _) => stored,
            (true, Some(q)) => ggml_name(q.ggml_dtype()).to_string(),
            (true, None) => dtype_name(opts.linear_dtype()).to_string(),
        }
    }

    /// The tensor as stored: dense on the CPU, or quantized (GGUF) on the CPU.
    fn stored(&self, name: &str) -> Result<Stored> {
        match self {
            WeightStore::Tensors(map) => map
                .get(name)
                .cloned()
                .map(Stored::Dense)
                .ok_or_else(|| err(format!("missing tensor {name}"))),
            WeightStore::Safetensors(st) => {
                if !st.names.contains(name) {
                    return Err(err(format!("missing tensor {name}")));
                }
                st.files.load(name, &Device::Cpu).map(Stored::Dense)
            }
            WeightStore::Gguf(g) => g.load(name),
        }
    }
}

/// A tensor as it comes out of a store, before the caller picks its compute format.
// With CUDA a QTensor is large; a `Stored` only lives while one weight loads.
#[allow(clippy::large_enum_variant)]
enum Stored {
    Dense(Tensor),
    Quantized(QTensor),
}

impl Stored {
    fn into_dense(self) -> Result<Tensor> {
        match self {
            Stored::Dense(t) => Ok(t),
            Stored::Quantized(q) => q.dequantize(&Device::Cpu),
        }
    }

    /// `part` of this tensor. Quantized rows move as opaque bytes; quantized columns too when
    /// the range falls on whole blocks, else the tensor is dequantized first.
    fn part(self, part: &Part) -> Result<Stored> {
        let (dim, range) = match part {
            Part::Whole => return Ok(self),
            Part::Rows(r) => (0, r.clone()),
            Part::Cols(r) => (1, r.clone()),
        };
        let dims = match &self {
            Stored::Dense(t) => t.dims().to_vec(),
            Stored::Quantized(q) => q.shape().dims().to_vec(),
        };
        if dims.len() <= dim || range.end > dims[dim] || range.is_empty() {
            return Err(err(format!(
                "cannot take {part:?} of a tensor of shape {dims:?}"
            )));
        }
        if range.len() == dims[dim] {
            return Ok(self);
        }
        let q = match self {
            Stored::Dense(t) => {
                return Ok(Stored::Dense(
                    t.narrow(dim, range.start, range.len())?.contiguous()?,
                ))
            }
            Stored::Quantized(q) => q,
        };
        let (dtype, block) = (q.dtype(), q.dtype().block_size());
        let per_row: usize = dims[1..].iter().product();
        let aligned = dims.len() == 2
            && (dim == 0
                || (range.start.is_multiple_of(block) && range.len().is_multiple_of(block)));
        if !aligned {
            let dense = q.dequantize(&Device::Cpu)?;
            return Ok(Stored::Dense(
                dense.narrow(dim, range.start, range.len())?.contiguous()?,
            ));
        }
        let data = q.data()?;
        let row_bytes = per_row / block * dtype.type_size();
        let mut bytes = Vec::new();
        let mut new_dims = dims.clone();
        if dim == 0 {
            bytes.extend_from_slice(&data[range.start * row_bytes..range.end * row_bytes]);
            new_dims[0] = range.len();
        } else {
            let (from, to) = (
                range.start / block * dtype.type_size(),
                range.end / block * dtype.type_size(),
            );
            bytes.reserve(dims[0] * (to - from));
            for row in data.chunks_exact(row_bytes) {
                bytes.extend_from_slice(&row[from..to]);
            }
            new_dims[1] = range.len();
        }
        ggml_file::qtensor_from_ggml(dtype, &bytes, new_dims, &Device::Cpu).map(Stored::Quantized)
    }
}

/// Whether a weight of this type computes on wick's kernels under `opts` (CPU only).
fn on_wick_kernels(dtype: GgmlDType, opts: &LoadOptions) -> bool {
    opts.device.is_cpu() && kernel_format(dtype).is_some()
}

/// A quantized weight of a format wick's kernels compute, repacked for them.
fn packed_linear(q: &QTensor, bias: Option<Tensor>, opts: &LoadOptions) -> Result<Linear> {
    let format = kernel_format(q.dtype()).ok_or_else(|| err(format!("{:?}", q.dtype())))?;
    let (n, k) = q.shape().dims2()?;
    let weight = PackedMatrix::from_ggml(format, &q.data()?, n, k).map_err(err)?;
    Ok(Linear::Packed {
        weight: std::sync::Arc::new(weight),
        level: opts.kernel_level,
        outliers: opts.activation_outliers,
        bias,
    })
}

/// Whether candle's CPU `QMatMul` has its fast repacked kernel for this weight (Q4K, Q8_0 and
/// Q6K with `k % 256 == 0` and `n % 16 == 0`); every other case takes a generic vec-dot path
/// whose speed does not grow with the number of rows.
pub fn has_fast_cpu_kernel(q: &QTensor) -> bool {
    fast_cpu_kernel(q.dtype(), q.shape().dims())
}

fn fast_cpu_kernel(dtype: GgmlDType, dims: &[usize]) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q8_0 | GgmlDType::Q6K)
        && dims.len() == 2
        && dims[1].is_multiple_of(256)
        && dims[0].is_multiple_of(16)
}

/// Linear-layer weights by name, HF or GGUF (embeddings and norms excluded).
fn is_linear_weight(name: &str) -> bool {
    const HF: &[&str] = &["_proj.weight", "lm_head.weight"];
    const GGUF: &[&str] = &[
        ".attn_q.weight",
        ".attn_k.weight",
        ".attn_v.weight",
        ".attn_output.weight",
        ".ffn_gate.weight",
        ".ffn_up.weight",
        ".ffn_down.weight",
    ];
    name == "output.weight"
        || HF.iter().any(|s| name.ends_with(s))
        || GGUF.iter().any(|s| name.ends_with(s))
}
