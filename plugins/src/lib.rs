//! Lumen's edge policies, one module each, with no Pingora types in their APIs so they are
//! tested as plain Rust.
//!
//! Each policy is a plain type with plain methods, called by the gateway at its step of the
//! pipeline (DESIGN.md, "Request pipeline"); there is no policy trait, because no two policies
//! share hooks (auth returns a `Principal`, limits a reservation, CORS a [`Decision`] and
//! headers for every response, including errors, so a browser can read a 401 or 429).
//!
//! | module | policy |
//! |---|---|
//! | [`address`] | who a request comes from (trusted proxies, `X-Forwarded-For`, IPv6 prefixes) and the per-address limit, in fixed memory |
//! | [`auth`] | who is calling: API keys (SHA-256 digests) and locally verified JWTs → [`auth::Principal`] |
//! | [`rate_limit`] | per-key request rate (GCRA) and concurrency limits, in process |
//! | [`cors`] | browser cross-origin access: preflight answered at the edge, response headers |
//! | [`cache`] | response cache: keys, memory and Redis tiers, coalescing |
//! | [`redis_link`] | the one Redis connection the policies above share |
//! | [`sse`] | the OpenAI stream codec: SSE ↔ JSON answer, token usage read off a stream (not a policy: shared by the cache and the jobs engine) |
//!
//! Imports: nothing of the gateway (this is its own crate) and no Pingora types; modules import
//! `redis_link`, `civil` and `sse` below them, never each other's internals.

pub mod address;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod civil;
pub mod cors;
pub mod glob;
pub mod rate_limit;
pub mod redis_link;
pub mod sse;

/// What a policy decided about a request.
#[derive(Debug)]
pub enum Decision {
    /// Go on with the pipeline.
    Continue,
    /// Answer now with this response; nothing later in the pipeline runs.
    Respond(http::Response<Vec<u8>>),
}

/// An OpenAI-shaped error body: `{"error":{"message","type","param","code"}}`.
pub fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    }))
    .unwrap_or_default()
}
