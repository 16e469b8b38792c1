//! The GGUF layout llama.cpp expects for a BERT encoder: its metadata keys, its WordPiece vocabulary
//! in llama.cpp's "phantom space" form, and the mapping from Hugging Face tensor names.
//!
//! Shared by the MiniLM conversion (`convert`) and the generated reranker test model
//! (`testmodel`), so both produce files llama.cpp's `bert` architecture loads the same way.

use crate::gguf::{GgufWriter, Value};

/// Token types as llama.cpp reads them from `tokenizer.ggml.token_type`.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;

/// Hyperparameters of a BERT encoder, named as in Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub hidden_size: u32,
    pub num_attention_heads: u32,
    pub num_hidden_layers: u32,
    pub intermediate_size: u32,
    pub max_position_embeddings: u32,
    pub type_vocab_size: u32,
    pub layer_norm_eps: f32,
    /// Uncased models lowercase (and strip accents from) their input before WordPiece.
    pub lowercase: bool,
    /// llama.cpp pooling type recorded as the model's default: 1 mean, 2 cls, 4 rank.
    pub pooling_type: u32,
}

/// Writes the architecture and tokenizer metadata. `vocab` is the Hugging Face `vocab.txt`
/// order; ids are positions in it, so special-token ids are looked up by text.
pub fn add_metadata(w: &mut GgufWriter, name: &str, cfg: &BertConfig, vocab: &[String]) {
    w.kv("general.architecture", Value::Str("bert".into()));
    w.kv("general.name", Value::Str(name.into()));
    w.kv(
        "bert.context_length",
        Value::U32(cfg.max_position_embeddings),
    );
    w.kv("bert.embedding_length", Value::U32(cfg.hidden_size));
    w.kv(
        "bert.feed_forward_length",
        Value::U32(cfg.intermediate_size),
    );
    w.kv("bert.block_count", Value::U32(cfg.num_hidden_layers));
    w.kv(
        "bert.attention.head_count",
        Value::U32(cfg.num_attention_heads),
    );
    w.kv(
        "bert.attention.layer_norm_epsilon",
        Value::F32(cfg.layer_norm_eps),
    );
    w.kv("bert.attention.causal", Value::Bool(false));
    w.kv("bert.pooling_type", Value::U32(cfg.pooling_type));

    w.kv("tokenizer.ggml.model", Value::Str("bert".into()));
    w.kv(
        "tokenizer.ggml.token_type_count",
        Value::U32(cfg.type_vocab_size),
    );
    w.kv(
        "tokenizer.ggml.normalizer.lowercase",
        Value::Bool(cfg.lowercase),
    );
    w.kv(
        "tokenizer.ggml.tokens",
        Value::StrArray(vocab.iter().map(|t| phantom(t)).collect()),
    );
    w.kv(
        "tokenizer.ggml.token_type",
        Value::I32Array(
            vocab
                .iter()
                .map(|t| {
                    if is_special(t) {
                        TOKEN_CONTROL
                    } else {
                        TOKEN_NORMAL
                    }
                })
                .collect(),
        ),
    );
    let id_of = |text: &str| vocab.iter().position(|t| t == text).map(|i| i as u32);
    for (key, text) in [
        ("tokenizer.ggml.bos_token_id", "[CLS]"),
        ("tokenizer.ggml.cls_token_id", "[CLS]"),
        ("tokenizer.ggml.seperator_token_id", "[SEP]"),
        ("tokenizer.ggml.unknown_token_id", "[UNK]"),
        ("tokenizer.ggml.padding_token_id", "[PAD]"),
        ("tokenizer.ggml.mask_token_id", "[MASK]"),
    ] {
        if let Some(id) = id_of(text) {
            w.kv(key, Value::U32(id));
        }
    }
}

/// The bracketed tokens BERT tokenizers treat as special.
fn is_special(token: &str) -> bool {
    matches!(token, "[PAD]" | "[UNK]" | "[CLS]" | "[SEP]" | "[MASK]")
}

/// llama.cpp's WordPiece tokenizer marks a word start with "▁" instead of marking continuations
/// with "##" (the same rewrite as llama.cpp's converter).
pub fn phantom(token: &str) -> String {
    if token.starts_with('[') && token.ends_with(']') {
        token.to_string()
    } else if let Some(rest) = token.strip_prefix("##") {
        rest.to_string()
    } else {
        format!("\u{2581}{token}")
    }
}

/// The GGUF name for a Hugging Face BERT tensor, or `None` for tensors llama.cpp does not use
/// (`position_ids`, the pooler). A leading `bert.` (task-head checkpoints) is ignored.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("bert.").unwrap_or(hf);
    let fixed = match hf {
        "embeddings.word_embeddings.weight" => Some("token_embd.weight"),
        "embeddings.position_embeddings.weight" => Some("position_embd.weight"),
        "embeddings.token_type_embeddings.weight" => Some("token_types.weight"),
        "embeddings.LayerNorm.weight" => Some("token_embd_norm.weight"),
        "embeddings.LayerNorm.bias" => Some("token_embd_norm.bias"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u32 = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let target = match module {
        "attention.self.query" => "attn_q",
        "attention.self.key" => "attn_k",
        "attention.self.value" => "attn_v",
        "attention.output.dense" => "attn_output",
        "attention.output.LayerNorm" => "attn_output_norm",
        "intermediate.dense" => "ffn_up",
        "output.dense" => "ffn_down",
        "output.LayerNorm" => "layer_output_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{target}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phantom_space_marks_word_starts() {
        assert_eq!(phantom("hello"), "\u{2581}hello");
        assert_eq!(phantom("##lo"), "lo");
        assert_eq!(phantom("[CLS]"), "[CLS]");
    }

    #[test]
    fn maps_hugging_face_names() {
        assert_eq!(
            gguf_tensor_name("encoder.layer.3.attention.self.query.bias").as_deref(),
            Some("blk.3.attn_q.bias")
        );
        assert_eq!(
            gguf_tensor_name("bert.encoder.layer.0.output.LayerNorm.weight").as_deref(),
            Some("blk.0.layer_output_norm.weight")
        );
        assert_eq!(
            gguf_tensor_name("embeddings.LayerNorm.bias").as_deref(),
            Some("token_embd_norm.bias")
        );
        assert_eq!(gguf_tensor_name("embeddings.position_ids"), None);
        assert_eq!(gguf_tensor_name("pooler.dense.weight"), None);
    }
}
