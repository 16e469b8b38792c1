//! Test support for Lumen: one harness and one HTTP client for every test. The harness starts
//! the real binaries on free ports (the gateway, redis-server, the `lumen-llama` sidecar); the
//! client is a small HTTP/1.1 client that records when each chunk arrives; the mock is an
//! OpenAI-compatible upstream (the only stand-in we allow: cloud providers cannot be reached
//! from tests). `openai` builds the requests tests send; `keyed` sends them as a key's holder
//! and reads the admin reports back; `batch` speaks the Batch API; `failover` and `chaos` drive
//! a fleet through a Redis failover and through parts dying.

pub mod batch;
pub mod blocking;
pub mod chaos;
pub mod client;
pub mod failover;
pub mod harness;
pub mod json_prefix;
pub mod keyed;
pub mod mock;
pub mod openai;
pub mod otlp;
pub mod sidecar;
pub mod sse;

pub use client::{Client, Response};
pub use harness::{bin_path, free_port, Lumen};
pub use mock::{MockUpstream, Recorded};
pub use openai::{chat, chat_with};
pub use sidecar::Sidecar;
