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
//! | `kind.rs` | [`Kind`] (which endpoint), the header fields an answer and its chunks share |
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
mod kind;
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

pub use assemble::Assembler;
pub use kind::Kind;
pub use render::render_sse;
