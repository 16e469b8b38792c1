//! The shapes of the `auth` config in the YAML: [`AuthMode`], the `keys:` entries
//! ([`KeyConfig`]) and the `jwt:` issuers ([`JwtConfig`], with their [`ClaimsMapping`]), as
//! deserialized, before any validation (`keys.rs` and `jwt.rs` validate them).
//!
//! A leaf of `auth`: it imports nothing of its parent, so that `keys.rs` and `jwt.rs` can use
//! these types while `mod.rs` uses theirs. `mod.rs` re-exports them all.

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every request needs a valid API key or JWT.
    #[default]
    Required,
    /// No credentials are read; every caller is
    /// [`Principal::anonymous`](super::Principal::anonymous).
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
    /// Dollars this key may spend per UTC day and month.
    #[serde(default)]
    pub budget: Option<crate::budget::BudgetConfig>,
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

/// Which claim feeds each [`Principal`](super::Principal) field.
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
    /// Optional claim: the caller's dollar budget, a number (USD per UTC day) or an object
    /// (`{"usd_per_day": …, "usd_per_month": …}`); default `budget_usd`.
    #[serde(default = "default_budget_claim")]
    pub budget_usd: String,
}

fn default_budget_claim() -> String {
    "budget_usd".into()
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
            budget_usd: default_budget_claim(),
        }
    }
}
