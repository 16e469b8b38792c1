//! Generated test models: tiny, deterministic, random-weight GGUF files that run through the
//! real llama.cpp code paths in milliseconds.
//!
//! * `chat`: a llama-architecture decoder (about 4 MB) with an SPM vocabulary of byte-fallback
//!   tokens (`<0x00>`..`<0xFF>`, so any UTF-8 tokenizes), the printable ASCII characters, the
//!   word-boundary piece `▁`, and ChatML control tokens; its chat template is in
//!   `tokenizer.chat_template`. The output head gives every control and byte token an all-zero
//!   row (logit exactly 0) while the character rows are scaled so that the best of them is
//!   positive with overwhelming probability: greedy decoding never ends on its own and emits only
//!   printable ASCII, which makes `max_tokens`, stop strings and stream/non-stream equality
//!   byte-exact checks. A grammar that rules out every character still lets end-of-generation
//!   through, so `json_object` output can finish.
//! * `rerank`: a BERT encoder (about 1 MB) with a WordPiece vocabulary and a classification head,
//!   loadable with rank pooling. Its scores are deterministic but carry no meaning.
//!
//! Weights come from a seeded SplitMix64 generator, so the same seed writes the same bytes.

use std::path::Path;

use crate::bert::{self, BertConfig};
use crate::gguf::{GgufError, GgufWriter, Value};

/// Which test model to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TestModelKind {
    Chat,
    Rerank,
}

/// A ChatML template, as instruct models ship it. llama.cpp recognises it by its markers.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// Chat model shape: small enough to be fast on two cores, big enough to batch meaningfully.
const N_EMBD: usize = 128;
const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const N_LAYER: usize = 4;
const N_FF: usize = 384;
const N_CTX_TRAIN: u32 = 32768;
/// Standard deviation of a character logit: large enough that end-of-generation (logit 0) is
/// practically never sampled even at temperature 1, small enough to leave sampling some choice.
const LOGIT_STD: f32 = 6.0;

/// Writes a test model of `kind` to `path`.
pub fn write(kind: TestModelKind, path: &Path, seed: u64) -> Result<(), GgufError> {
    match kind {
        TestModelKind::Chat => chat_model(seed).write_file(path),
        TestModelKind::Rerank => rerank_model(seed)?.write_file(path),
    }
}

/// SplitMix64: tiny, fast and good enough for weights; deterministic across platforms.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.unit(), self.unit());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// The chat model's vocabulary: (text, score, token type) with ids in order.
/// ids 0..5 are `<unk>`, `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`; then 256 byte tokens;
/// then `▁`; then the 94 printable ASCII characters other than space.
fn chat_vocab() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
        ("<|im_start|>".into(), 0.0, 3),
        ("<|im_end|>".into(), 0.0, 3),
    ];
    for b in 0u32..256 {
        v.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    v.push(("\u{2581}".into(), -1.0, 1));
    for c in 0x21u8..=0x7E {
        v.push(((c as char).to_string(), -1.0, 1));
    }
    v
}

/// Ids below this have zero output rows (control and byte tokens): see the module doc.
const FIRST_TEXT_TOKEN: usize = 5 + 256;

fn chat_model(seed: u64) -> GgufWriter {
    let mut rng = Rng(seed);
    let vocab = chat_vocab();
    let n_vocab = vocab.len();
    let head_dim = N_EMBD / N_HEAD;
    let kv_dim = head_dim * N_HEAD_KV;

    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::Str("llama".into()));
    w.kv("general.name", Value::Str("lumen-tiny-chat".into()));
    w.kv("llama.context_length", Value::U32(N_CTX_TRAIN));
    w.kv("llama.embedding_length", Value::U32(N_EMBD as u32));
    w.kv("llama.block_count", Value::U32(N_LAYER as u32));
    w.kv("llama.feed_forward_length", Value::U32(N_FF as u32));
    w.kv("llama.attention.head_count", Value::U32(N_HEAD as u32));
    w.kv(
        "llama.attention.head_count_kv",
        Value::U32(N_HEAD_KV as u32),
    );
    w.kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    w.kv("llama.rope.dimension_count", Value::U32(head_dim as u32));
    w.kv("llama.rope.freq_base", Value::F32(10000.0));
    w.kv("llama.vocab_size", Value::U32(n_vocab as u32));
    w.kv("tokenizer.ggml.model", Value::Str("llama".into()));
    w.kv(
        "tokenizer.ggml.tokens",
        Value::StrArray(vocab.iter().map(|t| t.0.clone()).collect()),
    );
    w.kv(
        "tokenizer.ggml.scores",
        Value::F32Array(vocab.iter().map(|t| t.1).collect()),
    );
    w.kv(
        "tokenizer.ggml.token_type",
        Value::I32Array(vocab.iter().map(|t| t.2).collect()),
    );
    w.kv("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.kv("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.kv("tokenizer.ggml.unknown_token_id", Value::U32(0));
    w.kv("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.kv("tokenizer.ggml.add_eos_token", Value::Bool(false));
    w.kv("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    w.kv("tokenizer.chat_template", Value::Str(CHAT_TEMPLATE.into()));

    let mut tensors: Vec<(String, Vec<u64>, Vec<f32>)> = Vec::new();
    let d = N_EMBD as u64;
    tensors.push((
        "token_embd.weight".into(),
        vec![d, n_vocab as u64],
        rng.normals(N_EMBD * n_vocab, 1.0),
    ));
    tensors.push(("output_norm.weight".into(), vec![d], vec![1.0; N_EMBD]));
    let mut output = rng.normals(N_EMBD * n_vocab, LOGIT_STD / (N_EMBD as f32).sqrt());
    output[..FIRST_TEXT_TOKEN * N_EMBD].fill(0.0);
    tensors.push(("output.weight".into(), vec![d, n_vocab as u64], output));

    let in_std = 1.0 / (N_EMBD as f32).sqrt();
    // Residual branches are scaled down with depth so activations stay in range.
    let out_std = in_std / (2.0 * N_LAYER as f32).sqrt();
    for l in 0..N_LAYER {
        let p = format!("blk.{l}");
        tensors.push((format!("{p}.attn_norm.weight"), vec![d], vec![1.0; N_EMBD]));
        tensors.push((format!("{p}.ffn_norm.weight"), vec![d], vec![1.0; N_EMBD]));
        tensors.push((
            format!("{p}.attn_q.weight"),
            vec![d, d],
            rng.normals(N_EMBD * N_EMBD, in_std),
        ));
        tensors.push((
            format!("{p}.attn_k.weight"),
            vec![d, kv_dim as u64],
            rng.normals(N_EMBD * kv_dim, in_std),
        ));
        tensors.push((
            format!("{p}.attn_v.weight"),
            vec![d, kv_dim as u64],
            rng.normals(N_EMBD * kv_dim, in_std),
        ));
        tensors.push((
            format!("{p}.attn_output.weight"),
            vec![d, d],
            rng.normals(N_EMBD * N_EMBD, out_std),
        ));
        tensors.push((
            format!("{p}.ffn_gate.weight"),
            vec![d, N_FF as u64],
            rng.normals(N_EMBD * N_FF, in_std),
        ));
        tensors.push((
            format!("{p}.ffn_up.weight"),
            vec![d, N_FF as u64],
            rng.normals(N_EMBD * N_FF, in_std),
        ));
        tensors.push((
            format!("{p}.ffn_down.weight"),
            vec![N_FF as u64, d],
            rng.normals(N_FF * N_EMBD, out_std / 2.0),
        ));
    }
    for (name, dims, data) in tensors {
        // Shapes are built right above; a mismatch is a bug in this function.
        w.tensor(&name, &dims, data)
            .expect("test model tensor shapes are consistent");
    }
    w
}

/// WordPiece vocabulary for the reranker: BERT's special ids at their usual places, then word
/// starts and continuations for lowercase letters and digits, and ASCII punctuation.
fn rerank_vocab() -> Vec<String> {
    let mut v: Vec<String> = vec!["[PAD]".into()];
    for i in 1..100 {
        v.push(format!("[unused{i}]"));
    }
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    for c in ('a'..='z').chain('0'..='9') {
        v.push(c.to_string());
        v.push(format!("##{c}"));
    }
    for c in (0x21u8..=0x7E).map(char::from) {
        if c.is_ascii_punctuation() {
            v.push(c.to_string());
        }
    }
    v
}

fn rerank_model(seed: u64) -> Result<GgufWriter, GgufError> {
    let mut rng = Rng(seed);
    let vocab = rerank_vocab();
    let cfg = BertConfig {
        hidden_size: 64,
        num_attention_heads: 4,
        num_hidden_layers: 2,
        intermediate_size: 128,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        lowercase: true,
        pooling_type: 4,
    };
    let mut w = GgufWriter::new();
    bert::add_metadata(&mut w, "lumen-tiny-rerank", &cfg, &vocab);
    w.kv(
        "bert.classifier.output_labels",
        Value::StrArray(vec!["relevance".into()]),
    );

    let d = cfg.hidden_size as usize;
    let ff = cfg.intermediate_size as usize;
    let std = 1.0 / (d as f32).sqrt();
    let mut hf: Vec<(String, Vec<u64>, Vec<f32>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![d as u64, vocab.len() as u64],
            rng.normals(d * vocab.len(), 1.0),
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![d as u64, 512],
            rng.normals(d * 512, 0.1),
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![d as u64, 2],
            rng.normals(d * 2, 0.1),
        ),
        (
            "embeddings.LayerNorm.weight".into(),
            vec![d as u64],
            vec![1.0; d],
        ),
        (
            "embeddings.LayerNorm.bias".into(),
            vec![d as u64],
            vec![0.0; d],
        ),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for (module, n_in, n_out) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", d, ff),
            ("output.dense", ff, d),
        ] {
            let s = 1.0 / (n_in as f32).sqrt();
            hf.push((
                format!("{p}.{module}.weight"),
                vec![n_in as u64, n_out as u64],
                rng.normals(n_in * n_out, s),
            ));
            hf.push((
                format!("{p}.{module}.bias"),
                vec![n_out as u64],
                vec![0.0; n_out],
            ));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            hf.push((format!("{p}.{norm}.weight"), vec![d as u64], vec![1.0; d]));
            hf.push((format!("{p}.{norm}.bias"), vec![d as u64], vec![0.0; d]));
        }
    }
    for (name, dims, data) in hf {
        let Some(gguf_name) = bert::gguf_tensor_name(&name) else {
            continue;
        };
        w.tensor(&gguf_name, &dims, data)?;
    }
    // Classification head: dense + tanh, then one relevance output.
    w.tensor("cls.weight", &[d as u64, d as u64], rng.normals(d * d, std))?;
    w.tensor("cls.bias", &[d as u64], vec![0.0; d])?;
    w.tensor("cls.output.weight", &[d as u64, 1], rng.normals(d, std))?;
    w.tensor("cls.output.bias", &[1], vec![0.0])?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        chat_model(7).write_to(&mut a).unwrap();
        chat_model(7).write_to(&mut b).unwrap();
        assert_eq!(a, b);
        let mut c = Vec::new();
        chat_model(8).write_to(&mut c).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn chat_vocab_has_every_byte_and_the_chatml_markers() {
        let v = chat_vocab();
        assert_eq!(v[3].0, "<|im_start|>");
        assert_eq!(v[4].0, "<|im_end|>");
        assert_eq!(v[5].0, "<0x00>");
        assert_eq!(v[5 + 255].0, "<0xFF>");
        assert_eq!(v[FIRST_TEXT_TOKEN].0, "\u{2581}");
        assert_eq!(v.len(), FIRST_TEXT_TOKEN + 1 + 94);
    }

    #[test]
    fn rerank_vocab_keeps_bert_special_ids() {
        let v = rerank_vocab();
        assert_eq!(v[0], "[PAD]");
        assert_eq!(v[100], "[UNK]");
        assert_eq!(v[101], "[CLS]");
        assert_eq!(v[102], "[SEP]");
        assert_eq!(v[103], "[MASK]");
    }

    #[test]
    fn normals_have_roughly_unit_variance() {
        let xs = Rng(1).normals(20_000, 1.0);
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
