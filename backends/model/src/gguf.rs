//! A GGUF file's header: its metadata and its tensors' names, shapes and types, read without
//! touching tensor data (the launcher checks a model with it; the shard's weight loader reads
//! the data itself).
//!
//! Layout (GGUF v2 and v3, little-endian): magic `GGUF`, version `u32`, tensor count `u64`,
//! metadata count `u64`, the metadata (`key`, `type: u32`, value), then per tensor its name,
//! `n_dims: u32`, `n_dims` × `u64` dimensions, type `u32` and data offset `u64`. Strings are a
//! `u64` length and UTF-8 bytes; arrays an element type `u32`, a `u64` length and the elements.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// `GGUF`, read as a little-endian `u32`.
const MAGIC: u32 = u32::from_le_bytes(*b"GGUF");

/// Longest string accepted (a key, a value, a tensor name): a corrupt length fails here
/// instead of allocating gigabytes.
const MAX_STRING: u64 = 1 << 24;

/// Most elements accepted in one array, and most dimensions in one tensor.
const MAX_ARRAY: u64 = 1 << 26;
const MAX_DIMS: u32 = 8;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// An integer of any width, as `usize`.
    pub fn to_usize(&self) -> Result<usize> {
        let n: i128 = match self {
            Value::U8(x) => (*x).into(),
            Value::I8(x) => (*x).into(),
            Value::U16(x) => (*x).into(),
            Value::I16(x) => (*x).into(),
            Value::U32(x) => (*x).into(),
            Value::I32(x) => (*x).into(),
            Value::U64(x) => (*x).into(),
            Value::I64(x) => (*x).into(),
            other => bail!("expected an integer, found {}", other.kind()),
        };
        usize::try_from(n).with_context(|| format!("integer {n} is out of range"))
    }

    /// A float or an integer, as `f64`. An `f32` goes through its shortest decimal form, so
    /// an `f32` `1e-5` reads as the `1e-5` config.json would give, not as 9.99999974e-6.
    pub fn to_f64(&self) -> Result<f64> {
        Ok(match self {
            Value::F32(x) => x.to_string().parse::<f64>()?,
            Value::F64(x) => *x,
            other => other.to_usize()? as f64,
        })
    }

    pub fn as_str(&self) -> Result<&str> {
        match self {
            Value::String(s) => Ok(s),
            other => bail!("expected a string, found {}", other.kind()),
        }
    }

    pub fn as_array(&self) -> Result<&[Value]> {
        match self {
            Value::Array(items) => Ok(items),
            other => bail!("expected an array, found {}", other.kind()),
        }
    }

    /// The value's GGUF type, for messages.
    fn kind(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Dimensions as GGUF stores them: innermost first (`[in, out]` for a matrix).
    pub dims: Vec<u64>,
    /// The ggml type id (0 f32, 1 f16, 2 q4_0, …).
    pub ggml_type: u32,
}

/// A GGUF file's header.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

impl Header {
    /// Reads the header of the GGUF file at `path`.
    pub fn read_file(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Self::read(&mut BufReader::new(file))
            .with_context(|| format!("reading the GGUF header of {}", path.display()))
    }

    /// Reads a header from the start of a GGUF stream.
    pub fn read(r: &mut impl Read) -> Result<Self> {
        let magic = read_u32(r).context("not a GGUF file (too short)")?;
        if magic != MAGIC {
            bail!("not a GGUF file (bad magic)");
        }
        let version = read_u32(r)?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (supported: 2, 3)");
        }
        let tensor_count = read_u64(r)?;
        let metadata_count = read_u64(r)?;
        let mut metadata = HashMap::new();
        for _ in 0..metadata_count {
            let key = read_string(r)?;
            let kind = read_u32(r)?;
            let value = read_value(r, kind).with_context(|| format!("metadata `{key}`"))?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for _ in 0..tensor_count {
            let name = read_string(r)?;
            let n_dims = read_u32(r)?;
            if n_dims > MAX_DIMS {
                bail!("tensor `{name}` has {n_dims} dimensions");
            }
            let dims = (0..n_dims)
                .map(|_| read_u64(r))
                .collect::<Result<Vec<_>>>()?;
            let ggml_type = read_u32(r)?;
            let _offset = read_u64(r)?;
            tensors.insert(name, TensorInfo { dims, ggml_type });
        }
        Ok(Self {
            version,
            metadata,
            tensors,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

fn read_bytes<const N: usize>(r: &mut impl Read) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).context("the GGUF header ends early")?;
    Ok(b)
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    Ok(u32::from_le_bytes(read_bytes(r)?))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    Ok(u64::from_le_bytes(read_bytes(r)?))
}

fn read_string(r: &mut impl Read) -> Result<String> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        bail!("a string of {len} bytes in the GGUF header");
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes)
        .context("the GGUF header ends early")?;
    // Some converters wrote tokens that are not valid UTF-8; keep them readable.
    Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
}

fn read_value(r: &mut impl Read, kind: u32) -> Result<Value> {
    Ok(match kind {
        0 => Value::U8(u8::from_le_bytes(read_bytes(r)?)),
        1 => Value::I8(i8::from_le_bytes(read_bytes(r)?)),
        2 => Value::U16(u16::from_le_bytes(read_bytes(r)?)),
        3 => Value::I16(i16::from_le_bytes(read_bytes(r)?)),
        4 => Value::U32(read_u32(r)?),
        5 => Value::I32(i32::from_le_bytes(read_bytes(r)?)),
        6 => Value::F32(f32::from_le_bytes(read_bytes(r)?)),
        7 => Value::Bool(u8::from_le_bytes(read_bytes(r)?) != 0),
        8 => Value::String(read_string(r)?),
        9 => {
            let element = read_u32(r)?;
            let len = read_u64(r)?;
            if len > MAX_ARRAY {
                bail!("an array of {len} elements");
            }
            if element == 9 {
                bail!("nested arrays are not supported");
            }
            let mut items = Vec::with_capacity(len.min(1 << 16) as usize);
            for _ in 0..len {
                items.push(read_value(r, element)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(read_u64(r)?),
        11 => Value::I64(i64::from_le_bytes(read_bytes(r)?)),
        12 => Value::F64(f64::from_le_bytes(read_bytes(r)?)),
        other => bail!("unknown GGUF value type {other}"),
    })
}

/// A GGUF header written by hand, field by field, for tests.
#[cfg(test)]
pub(crate) struct Writer(pub Vec<u8>);

#[cfg(test)]
impl Writer {
    pub fn new(version: u32, tensors: u64, kvs: u64) -> Self {
        let mut w = Self(b"GGUF".to_vec());
        w.u32(version).u64(tensors).u64(kvs);
        w
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_value_type_and_the_tensor_table() {
        let mut w = Writer::new(3, 2, 8);
        w.string("general.architecture").u32(8).string("llama");
        w.string("llama.block_count").u32(4).u32(30);
        w.string("a.u8").u32(0);
        w.0.push(7);
        w.string("a.i32").u32(5).u32((-3i32) as u32);
        w.string("a.f32").u32(6).u32(1e-5f32.to_bits());
        w.string("a.bool").u32(7);
        w.0.push(1);
        w.string("a.u64").u32(10).u64(1 << 40);
        w.string("tokenizer.ggml.tokens")
            .u32(9)
            .u32(8)
            .u64(3)
            .string("a")
            .string("b")
            .string("<s>");
        w.string("token_embd.weight")
            .u32(2)
            .u64(64)
            .u64(100)
            .u32(2)
            .u64(0);
        w.string("output_norm.weight")
            .u32(1)
            .u64(64)
            .u32(0)
            .u64(4096);
        // Tensor data follows the header; the reader never gets there.
        w.0.extend_from_slice(&[0xAB; 64]);

        let h = Header::read(&mut w.0.as_slice()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(
            h.get("general.architecture").unwrap().as_str().unwrap(),
            "llama"
        );
        assert_eq!(h.get("llama.block_count").unwrap().to_usize().unwrap(), 30);
        assert_eq!(h.get("a.u8"), Some(&Value::U8(7)));
        assert_eq!(h.get("a.i32"), Some(&Value::I32(-3)));
        assert!(h.get("a.i32").unwrap().to_usize().is_err());
        assert_eq!(h.get("a.f32").unwrap().to_f64().unwrap(), 1e-5);
        assert_eq!(h.get("a.bool"), Some(&Value::Bool(true)));
        assert_eq!(h.get("a.u64").unwrap().to_usize().unwrap(), 1 << 40);
        let tokens = h.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens[2].as_str().unwrap(), "<s>");
        assert_eq!(
            h.tensors["token_embd.weight"],
            TensorInfo {
                dims: vec![64, 100],
                ggml_type: 2
            }
        );
        assert_eq!(h.tensors["output_norm.weight"].dims, vec![64]);
    }

    #[test]
    fn rejects_what_is_not_a_readable_header() {
        let err = |bytes: &[u8]| format!("{:#}", Header::read(&mut &bytes[..]).unwrap_err());
        assert!(err(b"GGML\x03\0\0\0").contains("bad magic"));
        assert!(err(b"GG").contains("too short"));
        let v1 = Writer::new(1, 0, 0);
        assert!(err(&v1.0).contains("version 1"));
        // A string length past any real header, and a header cut short.
        let mut huge = Writer::new(3, 0, 1);
        huge.u64(1 << 40);
        assert!(err(&huge.0).contains("bytes in the GGUF header"));
        let mut cut = Writer::new(3, 0, 1);
        cut.string("general.architecture").u32(8).u64(10);
        cut.0.extend_from_slice(b"lla");
        assert!(err(&cut.0).contains("ends early"));
        let mut bad_type = Writer::new(3, 0, 1);
        bad_type.string("x").u32(99);
        assert!(err(&bad_type.0).contains("unknown GGUF value type 99"));
    }
}
