//! The admin listener's own credential: one key, stored like API keys (a SHA-256 digest, or
//! `key: ${ENV}` hashed at load), presented as `Authorization: Bearer X` or `X-API-Key: X`.
//!
//! It is separate from `keys:` on purpose: a client key must never open `/admin/*`, and the
//! admin key must never be usable against the proxy.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use http::HeaderMap;
use subtle::ConstantTimeEq;

use super::credential::credential;
use super::keys::{check_clear_key, digest_of, parse_hex_digest, KeyDigest};

/// `admin_key:` in the YAML: exactly one of `sha256` and `key`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKeyConfig {
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
}

/// The validated admin key.
#[derive(Clone)]
pub struct AdminKey {
    digest: KeyDigest,
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

impl AdminKey {
    /// Validates the config; the error names the field (`sha256` or `key`) and what is wrong.
    pub fn from_config(config: &AdminKeyConfig) -> Result<AdminKey, (&'static str, String)> {
        let digest = match (&config.sha256, &config.key) {
            (Some(hex), None) => parse_hex_digest(hex).map_err(|m| ("sha256", m))?,
            (None, Some(clear)) => {
                check_clear_key(clear).map_err(|m| ("key", m))?;
                digest_of(clear)
            }
            (Some(_), Some(_)) => {
                return Err(("sha256", "set either `sha256` or `key`, not both".into()))
            }
            (None, None) => {
                return Err((
                    "sha256",
                    "needs `sha256` (hash from `lumen keys hash`) or `key`".into(),
                ))
            }
        };
        Ok(AdminKey { digest })
    }

    /// Whether the request presents this key (compared in constant time).
    /// Bearer, `X-API-Key`, or HTTP Basic with the key as the password (any user name): a
    /// browser asks for Basic credentials itself and sends them with every request of the admin
    /// console, so the key never has to appear in a URL or a page.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        if let Some(password) = basic_password(headers) {
            return bool::from(digest_of(&password).ct_eq(&self.digest));
        }
        match credential(headers) {
            Ok(presented) => bool::from(digest_of(presented).ct_eq(&self.digest)),
            Err(_) => false,
        }
    }
}

/// The password of `Authorization: Basic base64(user:password)`.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_string())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    #[test]
    fn admits_only_the_configured_key() {
        let key = AdminKey::from_config(&AdminKeyConfig {
            sha256: Some(crate::auth::hash_key("adm-secret")),
            key: None,
        })
        .unwrap();
        assert!(key.admits(&headers("authorization", "Bearer adm-secret")));
        assert!(key.admits(&headers("x-api-key", "adm-secret")));
        assert!(!key.admits(&headers("authorization", "Bearer adm-secreT")));
        assert!(!key.admits(&HeaderMap::new()));
        // Basic: any user, the key as the password ("admin:adm-secret", "admin:wrong").
        assert!(key.admits(&headers("authorization", "Basic YWRtaW46YWRtLXNlY3JldA==")));
        assert!(!key.admits(&headers("authorization", "Basic YWRtaW46d3Jvbmc=")));
        assert!(!key.admits(&headers("authorization", "Basic !!!")));
    }

    #[test]
    fn refuses_empty_and_ambiguous_configs() {
        let none = AdminKeyConfig {
            sha256: None,
            key: None,
        };
        assert!(AdminKey::from_config(&none).is_err());
        let empty = AdminKeyConfig {
            sha256: None,
            key: Some(String::new()),
        };
        assert_eq!(AdminKey::from_config(&empty).unwrap_err().0, "key");
    }
}
