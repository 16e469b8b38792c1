//! [`AuthError`]: why a request's credentials were refused.
//!
//! A leaf of `auth`: it imports nothing of its parent, so that `keys.rs`, `jwt.rs` and
//! `credential.rs` can return it while `mod.rs` uses their items. `mod.rs` re-exports it.

/// Why a request was refused. Messages never contain the presented key or token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`")]
    Missing,
    #[error("invalid API key")]
    UnknownKey,
    #[error("API key has expired")]
    Expired,
    #[error("API key is disabled")]
    Disabled,
    /// The reason only (expired, bad signature, wrong audience, unknown issuer, …).
    #[error("invalid token: {0}")]
    Jwt(String),
}
