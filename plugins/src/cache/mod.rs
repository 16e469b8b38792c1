//! The response cache: which requests may be answered from it, under which key, and the
//! pieces the pipeline puts together (DESIGN.md step 6): [`store`] (memory tier, bounded by
//! bytes with TinyLFU eviction, and the Redis tier shared by the fleet), [`embed`] (embeddings
//! cached per input item), and [`flight`] (identical requests in flight wait for the first
//! instead of calling upstream). One stored answer is served as JSON or as an SSE stream with
//! the stream codec, [`crate::sse`].
//!
//! By default only deterministic requests are cached: chat and completions with
//! `temperature: 0` or a fixed `seed`, and every embeddings and rerank request. The key is a
//! SHA-256 over the caller's scope, the route, the effective model and the request body in
//! canonical form (keys sorted, numbers normalised), without the fields that only change how
//! an answer is delivered (`stream`, `stream_options`) or that do not change it (`user`).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod canon;
pub mod embed;
pub mod flight;
pub mod store;

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::sse::Kind;

/// Whose answers a cached answer may be served to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Only the same key (the default: no answer ever crosses keys).
    #[default]
    Key,
    /// Any key of the same tenant.
    Tenant,
    /// Every caller.
    Global,
}

/// Which requests are cached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only requests whose answer does not vary: `temperature: 0` or a `seed` for chat and
    /// completions; embeddings and rerank always.
    #[default]
    Deterministic,
    /// Every request of the route (sampling answers are replayed as they were first given).
    Always,
}

/// A route's cache settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub scope: Scope,
    /// Answers larger than this are not stored.
    pub max_entry_bytes: usize,
    pub when: When,
    /// Whether a hit counts against the caller's token budget (it never costs a provider).
    pub charge_tokens: bool,
}

/// The endpoint of a cacheable request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
    Embeddings,
    Rerank,
    /// One input of a list embeddings request, cached on its own.
    EmbeddingItem,
}

impl Api {
    fn tag(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completion => "completion",
            Api::Embeddings => "embeddings",
            Api::Rerank => "rerank",
            Api::EmbeddingItem => "embedding-item",
        }
    }

    /// The stream shape, for endpoints that stream.
    pub fn kind(self) -> Option<Kind> {
        match self {
            Api::Chat => Some(Kind::Chat),
            Api::Completion => Some(Kind::Completion),
            _ => None,
        }
    }
}

/// What the client asked of the cache with `Cache-Control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientControl {
    /// Look up, and store a fresh answer.
    Normal,
    /// `no-cache`: skip the lookup, but store the fresh answer.
    Refresh,
    /// `no-store`: neither look up nor store.
    Bypass,
}

/// Reads `Cache-Control` request directives.
pub fn client_control(headers: &http::HeaderMap) -> ClientControl {
    let mut control = ClientControl::Normal;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            match directive.as_str() {
                "no-store" => return ClientControl::Bypass,
                "no-cache" | "max-age=0" => control = ClientControl::Refresh,
                _ => {}
            }
        }
    }
    control
}

/// Whether a request with this body may be cached under `when`.
pub fn cacheable(api: Api, body: &Value, when: When) -> bool {
    let temperature = body.get("temperature").and_then(Value::as_f64);
    let seeded = body.get("seed").is_some_and(Value::is_number);
    deterministic(api, when, temperature, seeded)
}

/// The rule both forms share: every embeddings and rerank request, and chat or completions
/// that are greedy or seeded (OpenAI's default temperature is 1: absent means sampling).
fn deterministic(api: Api, when: When, temperature: Option<f64>, seeded: bool) -> bool {
    match (when, api) {
        (When::Always, _) => true,
        (_, Api::Embeddings | Api::Rerank | Api::EmbeddingItem) => true,
        (_, Api::Chat | Api::Completion) => temperature == Some(0.0) || seeded,
    }
}

/// [`cacheable`] read straight from the request's bytes: the two fields are borrowed, never
/// parsed into a tree (a huge `temperature` value costs a scan, not a copy). `None` when the
/// body is not a JSON object.
pub fn cacheable_raw(api: Api, raw: &[u8], when: When) -> Option<bool> {
    #[derive(Deserialize)]
    struct Sampling<'a> {
        #[serde(borrow, default)]
        temperature: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        seed: Option<&'a serde_json::value::RawValue>,
    }
    if when == When::Always || !matches!(api, Api::Chat | Api::Completion) {
        return Some(deterministic(api, when, None, false));
    }
    let sampling: Sampling = serde_json::from_slice(raw).ok()?;
    let temperature = sampling
        .temperature
        .and_then(|t| serde_json::from_str::<f64>(t.get()).ok());
    let seeded = sampling
        .seed
        .is_some_and(|s| serde_json::from_str::<serde_json::Number>(s.get()).is_ok());
    Some(deterministic(api, when, temperature, seeded))
}

/// [`key`] computed straight from the request's bytes, without parsing them into a tree (the
/// same key as [`key`] gives for the parsed body). `None` when the bytes are not JSON.
pub fn key_raw(
    scope: Scope,
    scope_id: &str,
    route: &str,
    model: &str,
    api: Api,
    query: &str,
    raw: &[u8],
) -> Option<String> {
    let mut hasher = key_hasher(scope, scope_id, route, model, api, query);
    let mut canonical_body = Vec::with_capacity(raw.len().min(1 << 20));
    canon::canonical_bytes(raw, NOT_IN_KEY, &mut canonical_body).ok()?;
    hasher.update(&canonical_body);
    Some(hex(&hasher.finalize()))
}

/// Body fields that never change the answer's content.
const NOT_IN_KEY: &[&str] = &["stream", "stream_options", "user", "model"];

/// The cache key for a request: hex SHA-256 of the scope, the route, the effective model, the
/// endpoint, the query string (as forwarded) and the canonical body. `scope_id` is the key id, tenant or empty for global.
pub fn key(
    scope: Scope,
    scope_id: &str,
    route: &str,
    model: &str,
    api: Api,
    query: &str,
    body: &Value,
) -> String {
    let mut hasher = key_hasher(scope, scope_id, route, model, api, query);
    let mut canonical_body = Vec::with_capacity(256);
    match body {
        // The fields that do not change the answer are skipped while writing, not removed
        // from a copy: a large body is never cloned to compute its key.
        Value::Object(map) => canonical_object(map, &[NOT_IN_KEY], &mut canonical_body),
        other => canonical(other, &mut canonical_body),
    }
    hasher.update(&canonical_body);
    hex(&hasher.finalize())
}

/// The key of each item of a list embeddings request, in linear time: the body without its
/// `input` is canonicalised and hashed once, and each item's key continues from that state
/// (a SHA-256 state is a few hundred bytes to copy). Length prefixes keep (body, item) pairs
/// apart.
pub fn item_keys(
    scope: Scope,
    scope_id: &str,
    route: &str,
    model: &str,
    query: &str,
    body: &Value,
    items: &[Value],
) -> Vec<String> {
    let mut shared = key_hasher(scope, scope_id, route, model, Api::EmbeddingItem, query);
    let mut canonical_body = Vec::with_capacity(256);
    match body {
        Value::Object(map) => canonical_object(map, &[NOT_IN_KEY, &["input"]], &mut canonical_body),
        other => canonical(other, &mut canonical_body),
    }
    shared.update((canonical_body.len() as u64).to_be_bytes());
    shared.update(&canonical_body);
    let mut item_bytes = Vec::with_capacity(64);
    items
        .iter()
        .map(|item| {
            item_bytes.clear();
            canonical(item, &mut item_bytes);
            let mut hasher = shared.clone();
            hasher.update((item_bytes.len() as u64).to_be_bytes());
            hasher.update(&item_bytes);
            hex(&hasher.finalize())
        })
        .collect()
}

/// A hasher that has taken the key's fixed parts, length-prefixed so that no two different
/// tuples hash the same bytes.
fn key_hasher(
    scope: Scope,
    scope_id: &str,
    route: &str,
    model: &str,
    api: Api,
    query: &str,
) -> Sha256 {
    let mut hasher = Sha256::new();
    let scope_tag = match scope {
        Scope::Key => "key",
        Scope::Tenant => "tenant",
        Scope::Global => "global",
    };
    // The query string is forwarded to the provider (e.g. `api-version`), so it may change
    // the answer: it is part of the key.
    for part in [scope_tag, scope_id, route, model, api.tag(), query] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher
}

/// [`canonical`] of an object without the fields named in `skip`.
fn canonical_object(map: &serde_json::Map<String, Value>, skip: &[&[&str]], out: &mut Vec<u8>) {
    let mut keys: Vec<&String> = map
        .keys()
        .filter(|k| !skip.iter().any(|names| names.contains(&k.as_str())))
        .collect();
    keys.sort();
    out.push(b'{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(k, out);
        out.push(b':');
        canonical(&map[k], out);
    }
    out.push(b'}');
}

fn write_string(text: &str, out: &mut Vec<u8>) {
    // Serialising a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Canonical JSON: object keys sorted, no whitespace, integral numbers written as integers
/// (`0.0` and `0` mean the same temperature).
pub fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => canonical_object(map, &[], out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                out.extend_from_slice((f as i64).to_string().as_bytes())
            }
            _ => out.extend_from_slice(n.to_string().as_bytes()),
        },
        other => {
            if let Ok(text) = serde_json::to_vec(other) {
                out.extend_from_slice(&text);
            }
        }
    }
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
    use serde_json::json;

    fn k(body: Value) -> String {
        let parsed = key(Scope::Key, "team-a", "fast", "fast", Api::Chat, "", &body);
        let raw = serde_json::to_vec(&body).unwrap();
        let streamed = key_raw(Scope::Key, "team-a", "fast", "fast", Api::Chat, "", &raw);
        assert_eq!(
            Some(parsed.clone()),
            streamed,
            "the key from bytes is the key from the tree"
        );
        parsed
    }

    #[test]
    fn key_ignores_order_whitespace_numbers_and_delivery() {
        let a = k(
            json!({"model": "fast", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let b: Value = serde_json::from_str(
            r#"{ "messages" : [ {"content":"hi", "role":"user"} ], "temperature": 0.0, "stream": true,
                 "stream_options": {"include_usage": true}, "user": "u-42", "model": "other" }"#,
        )
        .unwrap();
        assert_eq!(a, k(b));
    }

    #[test]
    fn key_changes_with_every_output_changing_field() {
        let base = json!({"temperature": 0, "messages": [{"role": "user", "content": "hi"}]});
        let reference = k(base.clone());
        for (field, value) in [
            ("max_tokens", json!(5)),
            ("top_p", json!(0.5)),
            ("seed", json!(1)),
            ("stop", json!(["x"])),
            ("tools", json!([])),
            ("response_format", json!({"type": "json_object"})),
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("presence_penalty", json!(0.1)),
        ] {
            let mut b = base.clone();
            b[field] = value;
            assert_ne!(k(b), reference, "{field}");
        }
        let mut other_text = base.clone();
        other_text["messages"][0]["content"] = json!("hi!");
        assert_ne!(k(other_text), reference);
        let mut warmer = base.clone();
        warmer["temperature"] = json!(0.7);
        assert_ne!(k(warmer), reference);
        // Scope, route, model and endpoint are all in it.
        assert_ne!(
            key(Scope::Key, "team-b", "fast", "fast", Api::Chat, "", &base),
            reference
        );
        assert_ne!(
            key(
                Scope::Tenant,
                "team-a",
                "fast",
                "fast",
                Api::Chat,
                "",
                &base
            ),
            reference
        );
        assert_ne!(
            key(Scope::Key, "team-a", "slow", "fast", Api::Chat, "", &base),
            reference
        );
        assert_ne!(
            key(Scope::Key, "team-a", "fast", "x", Api::Chat, "", &base),
            reference
        );
        assert_ne!(
            key(
                Scope::Key,
                "team-a",
                "fast",
                "fast",
                Api::Completion,
                "",
                &base
            ),
            reference
        );
    }

    #[test]
    fn only_deterministic_requests_by_default() {
        // Both forms, the parsed and the raw one, agree on every case.
        let chat = |b: Value| {
            let parsed = cacheable(Api::Chat, &b, When::Deterministic);
            let raw = serde_json::to_vec(&b).unwrap();
            assert_eq!(
                cacheable_raw(Api::Chat, &raw, When::Deterministic),
                Some(parsed),
                "{b}"
            );
            parsed
        };
        assert!(chat(json!({"temperature": 0})));
        assert!(chat(json!({"temperature": 0.0})));
        assert!(chat(json!({"seed": 7, "temperature": 0.8})));
        assert!(!chat(json!({})));
        assert!(!chat(json!({"temperature": 0.2})));
        assert!(!chat(json!({"temperature": "0", "seed": "7"})));
        assert!(!chat(json!({"temperature": [0], "seed": null})));
        assert!(cacheable(Api::Embeddings, &json!({}), When::Deterministic));
        assert!(cacheable(Api::Rerank, &json!({}), When::Deterministic));
        assert!(cacheable(Api::Chat, &json!({}), When::Always));
    }

    #[test]
    fn cache_control_directives() {
        let mut h = http::HeaderMap::new();
        assert_eq!(client_control(&h), ClientControl::Normal);
        h.insert(http::header::CACHE_CONTROL, "No-Cache".parse().unwrap());
        assert_eq!(client_control(&h), ClientControl::Refresh);
        h.insert(
            http::header::CACHE_CONTROL,
            "no-cache, no-store".parse().unwrap(),
        );
        assert_eq!(client_control(&h), ClientControl::Bypass);
    }
}
