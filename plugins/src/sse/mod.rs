//! The OpenAI stream codec: server-sent events (SSE) of `/v1/chat/completions` and
//! `/v1/completions`, read and written as plain bytes.
//!
//! One answer has two renderings: the JSON body of a non-stream response, and the SSE stream
//! that carries the same answer in pieces. [`Assembler`] reads a stream as it passes, in chunks
//! split anywhere, into the equivalent JSON answer; [`render_sse`] writes a JSON answer back as
//! the stream OpenAI would have sent. The response cache stores every answer as JSON and serves
//! it either way; the jobs engine assembles the streams it runs. [`usage`] reads the token
//! usage off a response as it streams past, and strips the usage-only chunk a client did not
//! ask for.
//!
//! Streams come from upstream providers and may be malformed: nothing here panics on any
//! input. No Pingora types, and nothing else of this crate: only `serde_json` (and `serde`,
//! `bytes` in [`usage`]), so all of it is tested as plain Rust.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Kind`] (which endpoint), the header fields an answer and its chunks share |
//! | `assemble.rs` | [`Assembler`]: an SSE stream → the non-stream JSON answer |
//! | `render.rs` | [`render_sse`]: a non-stream JSON answer → its SSE stream |
//! | `usage.rs` | [`usage::UsageTap`] (token usage off a JSON or SSE body), [`usage::UsageStrip`] (drops usage-only events) |
//! | `tests.rs` | tests of the assembler and the renderer, and their round trips |

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod assemble;
mod render;
pub mod usage;

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;

use serde_json::{Map, Value};

pub use assemble::Assembler;
pub use render::render_sse;

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
    fn answer_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        }
    }

    /// The `object` of a stream chunk (text completions use the same one as the answer).
    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }
}

/// Top-level fields that describe the whole answer; each chunk repeats them, the answer keeps
/// the first value seen. `object` is not among them: it differs between chunk and answer.
const HEADER_FIELDS: [&str; 5] = [
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
fn header_of(from: &Map<String, Value>, object: &str) -> Map<String, Value> {
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
