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

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod admin;
mod allow;
mod jwt;
mod keys;
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
use http::header::AUTHORIZATION;
use http::HeaderMap;

pub use self::admin::{AdminKey, AdminKeyConfig};
use self::allow::AllowList;
use self::jwt::IssuerTable;
use self::keys::KeyTable;

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every request needs a valid API key or JWT.
    #[default]
    Required,
    /// No credentials are read; every caller is [`Principal::anonymous`].
    Off,
}

/// One `keys:` entry of the YAML.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Names the key in logs, metrics and rate-limit buckets; unique.
    pub id: String,
    /// Hex SHA-256 of the key (either case), as printed by `lumen keys hash`. The preferred form:
    /// the config then holds nothing an attacker could use.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The key in clear (usually `${ENV}`), hashed at load. Exactly one of `sha256` and `key`.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// Models this key may call: exact names and globs with `*` and `?`. `None`: every model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// RFC 3339 time (e.g. `2027-01-31T00:00:00Z`) from which the key is refused.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Refuses the key with "disabled" (rather than "invalid") without deleting its entry.
    #[serde(default)]
    pub disabled: bool,
    /// Request rate and concurrency limits for this key.
    #[serde(default)]
    pub limits: Option<crate::rate_limit::LimitsConfig>,
}

/// One `jwt:` issuer.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Must equal the token's `iss`; also how a token finds this entry, and the namespace of
    /// its callers (`jwt:<issuer>:<sub>`).
    pub issuer: String,
    /// When set, the token's `aud` (string or array) must contain it.
    #[serde(default)]
    pub audience: Option<String>,
    /// The only algorithms accepted, e.g. `["RS256"]`. HS* may not be mixed with asymmetric
    /// ones: a verifier that accepts both can be fooled into using a public key as an HMAC secret.
    pub algorithms: Vec<String>,
    /// HMAC secret, for HS* algorithms.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key (RSA for RS*/PS*, EC for ES*, Ed25519 for EdDSA).
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// Local JWKS file; a token picks its key by `kid` (or gets the only key).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`; default 30 seconds.
    #[serde(default)]
    pub leeway_seconds: Option<u64>,
    /// Claims that must be present (non-null) besides `exp` and `iss`, which always are.
    #[serde(default)]
    pub required_claims: Vec<String>,
    #[serde(default)]
    pub claims: ClaimsMapping,
}

/// Which claim feeds each [`Principal`] field.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsMapping {
    /// String claim naming the caller (required in the token); default `sub`.
    #[serde(default = "default_key_id_claim")]
    pub key_id: String,
    /// Optional string claim; default `tenant`.
    #[serde(default = "default_tenant_claim")]
    pub tenant: String,
    /// Optional array-of-strings claim, the model allow-list; default `models`.
    #[serde(default = "default_models_claim")]
    pub models: String,
    /// Optional positive-integer claim: the caller's requests per minute; default `rpm`.
    #[serde(default = "default_rpm_claim")]
    pub requests_per_minute: String,
}

fn default_rpm_claim() -> String {
    "rpm".into()
}

fn default_key_id_claim() -> String {
    "sub".into()
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

fn default_models_claim() -> String {
    "models".into()
}

impl Default for ClaimsMapping {
    fn default() -> Self {
        ClaimsMapping {
            key_id: default_key_id_claim(),
            tenant: default_tenant_claim(),
            models: default_models_claim(),
            requests_per_minute: default_rpm_claim(),
        }
    }
}

/// Who is calling, after authentication.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Who is calling, in every place a caller is named (jobs' owner, cache scope `key`, limit
    /// buckets, usage rows, access log): the API key's `id`, or for a JWT
    /// `jwt:<iss>:<key-id claim>` (default claim `sub`), so that each issuer's subjects live in
    /// their own namespace and none can be mistaken for a static key (whose ids may not start
    /// with `jwt:`).
    pub key_id: String,
    /// The key's `tenant`, or a JWT's tenant claim namespaced like `key_id`.
    pub tenant: Option<String>,
    /// `None`: every model.
    models: Option<AllowList>,
    /// The key's (or the token's) limits; `None`: unlimited.
    pub limits: Option<crate::rate_limit::KeyLimits>,
    /// `key_id` names a key of the config (a bounded set, safe as a metrics label), rather
    /// than a JWT subject (unbounded).
    pub configured: bool,
}

impl Principal {
    /// A principal for callers outside this module (e.g. tests or the admin API).
    /// `models: None` allows every model.
    pub fn new(
        key_id: impl Into<String>,
        tenant: Option<String>,
        models: Option<Vec<String>>,
    ) -> Principal {
        Principal {
            key_id: key_id.into(),
            tenant,
            models: models.map(AllowList::new),
            limits: None,
            configured: false,
        }
    }

    /// Whether the allow-list lets this caller use `model` (exact name or glob match).
    /// The allow-list's entries; `None`: every model.
    pub fn models(&self) -> Option<Vec<String>> {
        self.models.as_ref().map(AllowList::entries)
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|list| list.allows(model))
    }

    /// The caller when auth is off: key id `anonymous`, every model allowed.
    pub fn anonymous() -> Principal {
        Principal {
            key_id: "anonymous".into(),
            tenant: None,
            models: None,
            limits: None,
            configured: false,
        }
    }
}

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

/// The presented credential: `Authorization: Bearer X` (scheme in any case), else `X-API-Key`.
fn credential(headers: &HeaderMap) -> Result<&str, AuthError> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let value = match bearer {
        Some(token) => token,
        None => match headers.get("x-api-key") {
            // Not visible ASCII: cannot be a key we issued.
            Some(v) => v.to_str().map_err(|_| AuthError::UnknownKey)?.trim(),
            None => return Err(AuthError::Missing),
        },
    };
    if value.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(value)
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
