//! The admin listener's own credential: one key, stored like API keys (a SHA-256 digest, or
//! `key: ${ENV}` hashed at load), presented as `Authorization: Bearer X` or `X-API-Key: X`.
//!
//! It is separate from `keys:` on purpose: a client key must never open `/admin/*`, and the
//! admin key must never be usable against the proxy.

use http::HeaderMap;
use subtle::ConstantTimeEq;

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
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        match super::credential(headers) {
            Ok(presented) => bool::from(digest_of(presented).ct_eq(&self.digest)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
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
