//! Test support for Lumen: the harness that starts the real binaries on free ports, a small
//! HTTP/1.1 client that records when each chunk arrives, and the mock OpenAI-compatible
//! upstream (the only stand-in we allow: cloud providers cannot be reached from tests).

pub mod client;
pub mod harness;
pub mod mock;

pub use client::{Client, Response};
pub use harness::{bin_path, free_port, Lumen};
pub use mock::{MockUpstream, Recorded};
