//! Lumen's edge policies, one module each, with no Pingora types in their APIs so they are
//! tested as plain Rust.
//!
//! A policy sees a request's head before the gateway acts on it, may answer it at the edge
//! ([`Decision::Respond`]), and may add headers to whatever response goes back — including
//! error responses, so that a browser can read a 401 or 429 through CORS. The gateway runs the
//! policies in the pipeline's fixed order (DESIGN.md, "Request pipeline").
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

pub mod address;
pub mod auth;
pub mod cache;
pub mod civil;
pub mod cors;
pub mod rate_limit;
pub mod redis_link;
pub mod sse;

use http::{HeaderName, HeaderValue};

/// What a policy decided about a request.
#[derive(Debug)]
pub enum Decision {
    /// Go on with the pipeline.
    Continue,
    /// Answer now with this response; nothing later in the pipeline runs.
    Respond(http::Response<Vec<u8>>),
}

/// One edge policy's hooks. Hooks are cheap and never block: they run on every request.
pub trait Policy: Send + Sync {
    /// Stable name, used in logs and metrics.
    fn name(&self) -> &'static str;

    /// Called once the request head is read, before authentication.
    fn on_request(&self, req: &http::request::Parts) -> Decision;

    /// Called before the response head is written, for every response (success or error).
    /// Headers pushed onto `add` are appended to the response.
    fn on_response(&self, req: &http::request::Parts, add: &mut Vec<(HeaderName, HeaderValue)>);
}

/// An OpenAI-shaped error body: `{"error":{"message","type","param","code"}}`.
pub fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    }))
    .unwrap_or_default()
}
