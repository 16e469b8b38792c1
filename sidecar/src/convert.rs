//! Hugging Face BERT checkpoint (config.json, vocab.txt, model.safetensors) → BERT GGUF.
//!
//! Used for all-MiniLM-L6-v2 (`fetch-model minilm`), but nothing here is specific to it: any
//! `BertModel` with absolute positions, F32/F16/BF16 safetensors and a WordPiece `vocab.txt`
//! converts the same way. Weights stay F32 so embeddings match the original model closely.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::bert::{self, BertConfig};
use crate::gguf::{GgufError, GgufWriter};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("config.json: {0}")]
    Config(serde_json::Error),
    #[error("config.json: {0}")]
    Unsupported(String),
    #[error("tokenizer_config.json: {0}")]
    TokenizerConfig(serde_json::Error),
    #[error("vocab.txt is not UTF-8")]
    Vocab,
    #[error("model.safetensors: {0}")]
    Safetensors(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// The `config.json` fields the conversion needs; the rest are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: u32,
    num_attention_heads: u32,
    num_hidden_layers: u32,
    intermediate_size: u32,
    max_position_embeddings: u32,
    #[serde(default = "two")]
    type_vocab_size: u32,
    #[serde(default = "default_eps")]
    layer_norm_eps: f32,
    #[serde(default = "absolute")]
    position_embedding_type: String,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn two() -> u32 {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn absolute() -> String {
    "absolute".into()
}

/// One tensor read from a safetensors file, in PyTorch shape order.
#[derive(Debug)]
pub struct HfTensor {
    pub shape: Vec<u64>,
    pub data: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct SafetensorsEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [usize; 2],
}

/// Parses a safetensors blob: an 8-byte little-endian header length, a JSON header mapping names
/// to dtype/shape/offsets, then the data. Integer tensors (e.g. `position_ids`) are skipped.
pub fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, HfTensor>, ConvertError> {
    let bad = |m: &str| ConvertError::Safetensors(m.to_string());
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("shorter than its header"))?;
    let header_len =
        usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| bad("header too large"))?;
    let header = bytes
        .get(8..8usize.saturating_add(header_len))
        .ok_or_else(|| bad("header runs past the end"))?;
    let data = &bytes[8 + header_len..];
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| ConvertError::Safetensors(e.to_string()))?;

    let mut out = BTreeMap::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry: SafetensorsEntry = serde_json::from_value(value)
            .map_err(|e| ConvertError::Safetensors(format!("{name}: {e}")))?;
        let [start, end] = entry.data_offsets;
        let raw = data
            .get(start..end)
            .ok_or_else(|| ConvertError::Safetensors(format!("{name}: offsets out of range")))?;
        let values: Vec<f32> = match entry.dtype.as_str() {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => raw
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            "BF16" => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            _ => continue,
        };
        let expected: u64 = entry.shape.iter().product();
        if expected != values.len() as u64 {
            return Err(ConvertError::Safetensors(format!(
                "{name}: shape {:?} does not match its {} values",
                entry.shape,
                values.len()
            )));
        }
        out.insert(
            name,
            HfTensor {
                shape: entry.shape,
                data: values,
            },
        );
    }
    Ok(out)
}

/// IEEE half → single precision, including subnormals, infinities and NaN.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise the fraction.
            let mut e: i32 = 0;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (((127 - 15 + 1 + e) as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// `tokenizer_config.json`'s one field that matters here. `BertTokenizer` lowercases unless
/// told otherwise.
#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    #[serde(default = "yes")]
    do_lower_case: bool,
}

fn yes() -> bool {
    true
}

/// Converts a BERT checkpoint to a GGUF at `out` (mean pooling recorded as its default, as
/// sentence-transformers models use).
pub fn bert_to_gguf(
    config_json: &[u8],
    tokenizer_config_json: &[u8],
    vocab_txt: &[u8],
    safetensors: &[u8],
    name: &str,
    out: &Path,
) -> Result<(), ConvertError> {
    let hf: HfConfig = serde_json::from_slice(config_json).map_err(ConvertError::Config)?;
    if hf.model_type != "bert" {
        return Err(ConvertError::Unsupported(format!(
            "model_type {:?}, expected \"bert\"",
            hf.model_type
        )));
    }
    if hf.position_embedding_type != "absolute" {
        return Err(ConvertError::Unsupported(format!(
            "position_embedding_type {:?}, only \"absolute\" is supported",
            hf.position_embedding_type
        )));
    }
    if hf.hidden_act.as_deref().is_some_and(|a| a != "gelu") {
        return Err(ConvertError::Unsupported(format!(
            "hidden_act {:?}, llama.cpp's BERT uses gelu",
            hf.hidden_act
        )));
    }
    let tokenizer: TokenizerConfig =
        serde_json::from_slice(tokenizer_config_json).map_err(ConvertError::TokenizerConfig)?;
    let vocab: Vec<String> = std::str::from_utf8(vocab_txt)
        .map_err(|_| ConvertError::Vocab)?
        .lines()
        .map(str::to_string)
        .collect();
    let cfg = BertConfig {
        hidden_size: hf.hidden_size,
        num_attention_heads: hf.num_attention_heads,
        num_hidden_layers: hf.num_hidden_layers,
        intermediate_size: hf.intermediate_size,
        max_position_embeddings: hf.max_position_embeddings,
        type_vocab_size: hf.type_vocab_size,
        layer_norm_eps: hf.layer_norm_eps,
        lowercase: tokenizer.do_lower_case,
        pooling_type: 1,
    };

    let mut w = GgufWriter::new();
    bert::add_metadata(&mut w, name, &cfg, &vocab);
    for (hf_name, tensor) in read_safetensors(safetensors)? {
        let Some(gguf_name) = bert::gguf_tensor_name(&hf_name) else {
            continue;
        };
        // PyTorch [out, in] row-major is GGUF [in, out]: same bytes, reversed dims.
        let dims: Vec<u64> = tensor.shape.iter().rev().copied().collect();
        w.tensor(&gguf_name, &dims, tensor.data)?;
    }
    w.write_file(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors(entries: &[(&str, &str, &[u64], Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in entries {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn reads_f32_f16_and_skips_integers() {
        let f32s: Vec<u8> = [1.0f32, -2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f16s: Vec<u8> = [0x3c00u16, 0xc000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let blob = safetensors(&[
            ("a", "F32", &[2], f32s),
            ("b", "F16", &[1, 2], f16s),
            ("ids", "I64", &[1], vec![0; 8]),
        ]);
        let t = read_safetensors(&blob).unwrap();
        assert_eq!(t["a"].data, vec![1.0, -2.5]);
        assert_eq!(t["b"].data, vec![1.0, -2.0]);
        assert_eq!(t["b"].shape, vec![1, 2]);
        assert!(!t.contains_key("ids"));
    }

    #[test]
    fn rejects_truncated_files() {
        assert!(read_safetensors(&[1, 2, 3]).is_err());
        let mut blob = safetensors(&[("a", "F32", &[2], vec![0; 8])]);
        blob.truncate(blob.len() - 1);
        assert!(read_safetensors(&blob).is_err());
    }

    #[test]
    fn half_precision_edge_cases() {
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn refuses_non_bert_configs() {
        let cfg = br#"{"model_type":"roberta","hidden_size":8,"num_attention_heads":2,
            "num_hidden_layers":1,"intermediate_size":16,"max_position_embeddings":8}"#;
        let out = std::env::temp_dir().join("lumen-never-written.gguf");
        let err = bert_to_gguf(cfg, b"{}", b"[PAD]\n", &safetensors(&[]), "x", &out).unwrap_err();
        assert!(matches!(err, ConvertError::Unsupported(_)));
    }
}
