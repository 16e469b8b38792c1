//! A small GGUF (version 3) writer: header, key/value metadata, tensor infos, aligned F32 data.
//!
//! It exists so the project can make its own model files (the generated test models and the
//! MiniLM conversion) without Python or a download. It writes only what those need: scalar,
//! string and array metadata, and F32 tensors. Reading GGUF is llama.cpp's job.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// GGUF's default data alignment; llama.cpp accepts any power of two via `general.alignment`.
const ALIGNMENT: u64 = 32;
const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// `ggml_type` id of F32 tensors.
const GGML_TYPE_F32: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("tensor {name}: shape {dims:?} holds {expected} values but {actual} were given")]
    ShapeMismatch {
        name: String,
        dims: Vec<u64>,
        expected: u64,
        actual: usize,
    },
    #[error("duplicate tensor name {0}")]
    DuplicateTensor(String),
    #[error("writing {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// A metadata value. Array variants cover what llama.cpp reads from arrays (tokens, scores, types).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

impl Value {
    /// The GGUF value type tag (`gguf_type`).
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::StrArray(_) | Value::F32Array(_) | Value::I32Array(_) => 9,
        }
    }
}

/// One tensor: its name, its shape with the fastest-varying dimension first (GGUF's `ne[0]`),
/// and row-major data. A PyTorch `[out, in]` weight is GGUF `[in, out]` with the same bytes.
#[derive(Debug)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    data: Vec<f32>,
}

/// Collects metadata and tensors, then writes them in one pass.
#[derive(Debug, Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry; a later entry with the same key replaces the earlier one.
    pub fn kv(&mut self, key: &str, value: Value) {
        self.kv.retain(|(k, _)| k != key);
        self.kv.push((key.to_string(), value));
    }

    /// Adds an F32 tensor. `dims` are GGUF order (`ne[0]` first).
    pub fn tensor(&mut self, name: &str, dims: &[u64], data: Vec<f32>) -> Result<(), GgufError> {
        let expected: u64 = dims.iter().product();
        if expected != data.len() as u64 {
            return Err(GgufError::ShapeMismatch {
                name: name.to_string(),
                dims: dims.to_vec(),
                expected,
                actual: data.len(),
            });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name.to_string()));
        }
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            data,
        });
        Ok(())
    }

    /// Writes the file through a temporary name and renames it into place, so a reader never
    /// sees a half-written model.
    pub fn write_file(&self, path: &Path) -> Result<(), GgufError> {
        let io_err = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("gguf.partial");
        let file = File::create(&tmp).map_err(io_err)?;
        let mut out = BufWriter::new(file);
        self.write_to(&mut out).map_err(io_err)?;
        out.flush().map_err(io_err)?;
        drop(out);
        std::fs::rename(&tmp, path).map_err(io_err)
    }

    /// Serialises the whole file: header, metadata, tensor infos, padding, aligned data.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64 + 1).to_le_bytes());
        head.extend_from_slice(&encode_kv(
            "general.alignment",
            &Value::U32(ALIGNMENT as u32),
        ));
        for (key, value) in &self.kv {
            head.extend_from_slice(&encode_kv(key, value));
        }
        let mut offset: u64 = 0;
        for t in &self.tensors {
            head.extend_from_slice(&encode_str(&t.name));
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&GGML_TYPE_F32.to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = align(offset + t.data.len() as u64 * 4);
        }
        let head_len = head.len() as u64;
        head.resize(align(head_len) as usize, 0);
        w.write_all(&head)?;

        for t in &self.tensors {
            let mut bytes = Vec::with_capacity(t.data.len() * 4);
            for v in &t.data {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            let len = bytes.len() as u64;
            bytes.resize(align(len) as usize, 0);
            w.write_all(&bytes)?;
        }
        Ok(())
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn encode_str(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn encode_kv(key: &str, value: &Value) -> Vec<u8> {
    let mut out = encode_str(key);
    out.extend_from_slice(&value.type_id().to_le_bytes());
    match value {
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::Str(s) => out.extend_from_slice(&encode_str(s)),
        Value::StrArray(items) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                out.extend_from_slice(&encode_str(s));
            }
        }
        Value::F32Array(items) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Value::I32Array(items) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_header_metadata_and_aligned_data() {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::Str("llama".into()));
        w.tensor("a", &[3], vec![1.0, 2.0, 3.0]).unwrap();
        w.tensor("b", &[2, 1], vec![4.0, 5.0]).unwrap();
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();

        assert_eq!(&bytes[0..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 2);
        // Data: tensor a at an aligned start, tensor b 32 bytes later; each padded to 32.
        let data_len = 32 + 32;
        let start = bytes.len() - data_len;
        assert_eq!(start % 32, 0);
        assert_eq!(
            f32::from_le_bytes(bytes[start..start + 4].try_into().unwrap()),
            1.0
        );
        assert_eq!(
            f32::from_le_bytes(bytes[start + 32..start + 36].try_into().unwrap()),
            4.0
        );
    }

    #[test]
    fn rejects_a_shape_that_does_not_match_the_data() {
        let mut w = GgufWriter::new();
        let err = w.tensor("x", &[2, 2], vec![0.0; 3]).unwrap_err();
        assert!(matches!(err, GgufError::ShapeMismatch { expected: 4, .. }));
    }

    #[test]
    fn later_kv_replaces_earlier() {
        let mut w = GgufWriter::new();
        w.kv("k", Value::U32(1));
        w.kv("k", Value::U32(2));
        assert_eq!(w.kv, vec![("k".to_string(), Value::U32(2))]);
    }
}
