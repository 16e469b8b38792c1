//! What the ledger counts: one row's identity ([`RowKey`]: day, key, provider, model) and its
//! [`Counts`]. A leaf of `ledger`: the in-memory shards and the stores (file, Redis) share it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::day::Day;

/// What is counted, per row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub errors: u64,
    pub cache_hits: u64,
    /// What the requests cost at the configured prices, in micro-dollars.
    #[serde(default)]
    pub cost_micros: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.errors += other.errors;
        self.cache_hits += other.cache_hits;
        self.cost_micros += other.cost_micros;
    }

    /// (field name, value) pairs, in a fixed order (the store's field names).
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("requests", self.requests),
            ("prompt_tokens", self.prompt_tokens),
            ("completion_tokens", self.completion_tokens),
            ("errors", self.errors),
            ("cache_hits", self.cache_hits),
            ("cost_micros", self.cost_micros),
        ]
    }

    pub(super) fn set(&mut self, field: &str, value: u64) {
        match field {
            "requests" => self.requests = value,
            "prompt_tokens" => self.prompt_tokens = value,
            "completion_tokens" => self.completion_tokens = value,
            "errors" => self.errors = value,
            "cache_hits" => self.cache_hits = value,
            "cost_micros" => self.cost_micros = value,
            _ => {}
        }
    }
}

/// One row's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub day: Day,
    pub key: Box<str>,
    /// The caller's tenant (empty: none).
    pub tenant: Box<str>,
    pub provider: Box<str>,
    pub model: Box<str>,
}

impl RowKey {
    /// The catch-all row of `day`, where requests are counted once a day's rows are capped.
    pub fn other(day: Day) -> RowKey {
        RowKey {
            day,
            key: "_other".into(),
            tenant: "".into(),
            provider: "_other".into(),
            model: "_other".into(),
        }
    }
}

/// A batch on its way to the store: kept until the store took it, so reads still see it.
pub(super) type Batch = HashMap<RowKey, Counts>;
