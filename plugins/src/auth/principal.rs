//! [`Principal`]: who is calling, after authentication, and which models they may use.
//!
//! A leaf of `auth`: it imports nothing of its parent (only the sibling `allow.rs`), so that
//! `keys.rs` and `jwt.rs` can build principals while `mod.rs` uses their tables. `mod.rs`
//! re-exports it.

// Reachable from the network: no panics (issue 16).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use super::allow::AllowList;

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
    /// `None`: every model. Visible to `auth`'s files, which build principals from config and
    /// tokens.
    pub(super) models: Option<AllowList>,
    /// The key's (or the token's) limits; `None`: unlimited.
    pub limits: Option<crate::rate_limit::KeyLimits>,
    /// The key's (or the token's) dollar budget; `None`: none of its own (its tenant's may
    /// still apply).
    pub budget: Option<std::sync::Arc<crate::budget::Budget>>,
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
            budget: None,
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
            budget: None,
            configured: false,
        }
    }
}
