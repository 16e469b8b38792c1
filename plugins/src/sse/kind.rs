//! [`Kind`] (which OpenAI endpoint a body belongs to) and the header fields an answer and its
//! stream chunks share.
//!
//! A leaf of `sse`: it imports nothing of its parent, so that `assemble.rs` and `render.rs` can
//! use it while `mod.rs` re-exports their items. `mod.rs` re-exports [`Kind`].

// Reachable from the network: no panics (issue 16).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use serde_json::{Map, Value};

/// Which OpenAI endpoint a body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions` (legacy text completions).
    Completion,
}

impl Kind {
    /// The `object` of a non-stream answer.
    pub(super) fn answer_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        }
    }

    /// The `object` of a stream chunk (text completions use the same one as the answer).
    pub(super) fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }
}

/// Top-level fields that describe the whole answer; each chunk repeats them, the answer keeps
/// the first value seen. `object` is not among them: it differs between chunk and answer.
pub(super) const HEADER_FIELDS: [&str; 5] = [
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

/// Header fields every answer and chunk carries, `null` when the upstream never sent them.
const REQUIRED_HEADER_FIELDS: [&str; 3] = ["id", "created", "model"];

/// The header fields of `from` with `object` set: `id`, `created` and `model` always
/// (`null` when missing), the optional ones when present.
pub(super) fn header_of(from: &Map<String, Value>, object: &str) -> Map<String, Value> {
    let mut header = Map::new();
    for name in HEADER_FIELDS {
        match from.get(name) {
            Some(value) if !value.is_null() => {
                header.insert(name.to_string(), value.clone());
            }
            _ if REQUIRED_HEADER_FIELDS.contains(&name) => {
                header.insert(name.to_string(), Value::Null);
            }
            _ => {}
        }
    }
    header.insert("object".into(), Value::String(object.to_string()));
    header
}
