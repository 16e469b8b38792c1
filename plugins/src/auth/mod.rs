//! Authentication: turns a request's credentials into a [`Principal`], or refuses it.
//!
//! Two kinds of credential, both sent as `Authorization: Bearer X` or `X-API-Key: X`:
//! - static API keys from `keys:`, stored as SHA-256 digests only (`keys.rs`);
//! - JWTs from the issuers in `jwt:`, verified locally against a pinned algorithm list and a
//!   secret, PEM key or JWKS file read at config load (`jwt.rs`) — no network on the hot path.
//!
//! A credential with three dot-separated base64url parts is a JWT; anything else is an API key.
//! This module only says who is calling and which models they may use
//! ([`Principal::may_use`]); refusing a model, rate limits and the HTTP status of an
//! [`AuthError`] belong to the gateway.
//!
//! With `mode: off` every request is let through as [`Principal::anonymous`]'s caller (the
//! gateway substitutes it for the `Ok(None)` that [`Authenticator::authenticate`] returns), but
//! the `keys:` and `jwt:` sections are still validated so that turning auth on cannot fail
//! later. `mode: required` with no keys and no issuers is allowed and refuses everyone.
//!
//! This file holds [`Authenticator`] and the key helpers of the CLI ([`hash_key`],
//! [`generate_key`]). The types the other files share live in leaves that import nothing of this
//! one, re-exported here: [`Principal`] (`principal.rs`), [`AuthError`] (`error.rs`), the config
//! shapes [`AuthMode`], [`KeyConfig`], [`JwtConfig`], [`ClaimsMapping`] (`settings.rs`), and the
//! header reading shared with the admin key (`credential.rs`).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod admin;
mod allow;
mod credential;
mod error;
mod jwt;
mod keys;
mod principal;
mod settings;
#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests;

use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderMap;

pub use self::admin::{AdminKey, AdminKeyConfig};
use self::credential::credential;
pub use self::error::AuthError;
use self::jwt::IssuerTable;
use self::keys::KeyTable;
pub use self::principal::Principal;
pub use self::settings::{AuthMode, ClaimsMapping, JwtConfig, KeyConfig};

/// The validated `auth` config, ready for requests. Built once per config snapshot.
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    keys: KeyTable,
    issuers: IssuerTable,
}

impl Authenticator {
    /// Builds the lookup tables, reading JWT key files now (config load may block).
    ///
    /// Every problem comes back, each as (YAML path such as `keys[2].sha256` or
    /// `jwt[0].public_key_file`, message), so `lumen check` can print them all at once.
    pub fn new(
        mode: AuthMode,
        keys: &[KeyConfig],
        jwt: &[JwtConfig],
    ) -> Result<Authenticator, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let keys = KeyTable::build(keys, &mut problems);
        let issuers = IssuerTable::build(jwt, &mut problems);
        if problems.is_empty() {
            Ok(Authenticator {
                mode,
                keys,
                issuers,
            })
        } else {
            Err(problems)
        }
    }

    /// Authenticates a request from its headers at `now`.
    ///
    /// `Ok(None)`: auth is off (use [`Principal::anonymous`]). `Authorization: Bearer` wins over
    /// `X-API-Key` when both are sent. API keys cost one SHA-256 and no allocation.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<Option<Arc<Principal>>, AuthError> {
        if self.mode == AuthMode::Off {
            return Ok(None);
        }
        let credential = credential(headers)?;
        if looks_like_jwt(credential) {
            self.issuers
                .verify(credential, now)
                .map(|p| Some(Arc::new(p)))
        } else {
            self.keys.lookup(credential, now).map(Some)
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The configured key `id` as a caller, when it exists, is enabled and has not expired
    /// (async jobs run later as the key that submitted them, and see its current limits).
    pub fn principal_by_id(&self, id: &str, now: SystemTime) -> Option<Arc<Principal>> {
        self.keys.by_id(id, now)
    }

    /// Every configured key's caller (for reports such as `/admin/budgets`), by id.
    pub fn principals(&self) -> Vec<Arc<Principal>> {
        self.keys.principals()
    }

    /// What is valid but probably not meant: JWT issuers without an `audience` (their tokens
    /// minted for any other service would be accepted). One line each, for `lumen check` and
    /// the start-up log.
    pub fn warnings(&self) -> Vec<String> {
        self.issuers
            .without_audience()
            .into_iter()
            .map(|iss| {
                format!("jwt issuer `{iss}` sets no `audience`: tokens it issued for any other service are accepted here")
            })
            .collect()
    }

    /// How many API keys and JWT issuers are configured (for startup logs).
    pub fn counts(&self) -> (usize, usize) {
        (self.keys.len(), self.issuers.len())
    }
}

/// Three non-empty dot-separated parts of base64url characters. API keys from
/// [`generate_key`] contain no dot, so they never take this path.
fn looks_like_jwt(credential: &str) -> bool {
    let mut parts = 0usize;
    for part in credential.split('.') {
        // At most one per byte of `credential`: no overflow.
        parts = parts.saturating_add(1);
        let base64url = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        if part.is_empty() || !part.bytes().all(base64url) {
            return false;
        }
    }
    parts == 3
}

/// Lowercase hex SHA-256 of `key`: the `sha256` value for a `keys:` entry (`lumen keys hash`).
pub fn hash_key(key: &str) -> String {
    use std::fmt::Write;
    let digest = keys::digest_of(key);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// A fresh key and its [`hash_key`] (`lumen keys generate`): `lm-` and 32 bytes from the OS
/// CSPRNG in unpadded base64url (256 bits, so guessing is hopeless).
///
/// # Panics
/// If the OS has no random source; there is no safe fallback for a secret.
// CLI only (`lumen keys generate`), never on a request; no safe fallback exists for a secret.
#[allow(clippy::expect_used)]
pub fn generate_key() -> (String, String) {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("OS random source unavailable");
    let key = format!("lm-{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_key(&key);
    (key, hash)
}
