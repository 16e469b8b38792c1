//! Stored responses (the Responses API's `store: true`, its default): a response and the
//! conversation's input items, kept per key for `store_ttl`, so a later request continues it
//! (`previous_response_id`) and `GET /v1/responses/{id}` (`/input_items`) and `DELETE` find
//! it. In this process without `redis:` (bounded by `max_stored`, oldest out first); in Redis
//! with it, so any node of a fleet answers.
//!
//! Keys are private to their owner: the owner (a key id, or `jwt:<issuer>:<subject>`) is part
//! of the key, length-prefixed so no two owners' keys can meet (`{prefix:responses}:<len>:
//! <owner>:<id>`). Another key asking for an id finds nothing (404), as if it never existed.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lumen_plugins::redis_link::RedisLink;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::openai::LlmRequest;

/// A stored response and the input it answered (every item of the conversation so far, the
/// earlier turns' included): what a continuation replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub response: Value,
    pub input: Vec<Value>,
}

impl Stored {
    /// The conversation as input items for the next turn: this one's input, then its output.
    pub fn history(&self) -> Vec<Value> {
        let mut items = self.input.clone();
        if let Some(output) = self.response.get("output").and_then(Value::as_array) {
            items.extend(output.iter().cloned());
        }
        items
    }
}

/// What a finished translated Responses answer leaves to keep: set up when the request
/// starts, its response filled in when the answer is complete.
#[derive(Debug)]
pub struct Keep {
    pub id: String,
    /// The conversation's input items: the stored history, then this request's input.
    pub input: Vec<Value>,
    pub response: Option<Value>,
}

impl Keep {
    /// For a Responses request that asks to be stored (`store` is true unless set false).
    pub fn of(req: &LlmRequest, id: &str) -> Option<Keep> {
        let original = req.original.as_ref()?;
        if original.get("store").and_then(Value::as_bool) == Some(false) {
            return None;
        }
        let mut input: Vec<Value> = req
            .history
            .as_deref()
            .map(|h| h.to_vec())
            .unwrap_or_default();
        match original.get("input") {
            Some(Value::String(text)) => input.push(json!({
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}],
            })),
            Some(Value::Array(items)) => input.extend(items.iter().cloned()),
            _ => {}
        }
        Some(Keep {
            id: id.to_string(),
            input,
            response: None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the response store is unavailable: {0}")]
    Unavailable(String),
}

/// Where stored responses live.
pub enum ResponseStore {
    Memory(Memory),
    Redis {
        link: Arc<RedisLink>,
        prefix: String,
    },
}

impl ResponseStore {
    /// In Redis when `redis` is given, else in this process with at most `max_stored`.
    pub fn new(redis: Option<(Arc<RedisLink>, String)>, max_stored: usize) -> ResponseStore {
        match redis {
            Some((link, prefix)) => ResponseStore::Redis { link, prefix },
            None => ResponseStore::Memory(Memory::new(max_stored)),
        }
    }

    pub async fn put(
        &self,
        owner: &str,
        id: &str,
        stored: &Stored,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self {
            ResponseStore::Memory(m) => {
                m.put(owner, id, stored.clone(), ttl);
                Ok(())
            }
            ResponseStore::Redis { link, prefix } => {
                let body = serde_json::to_string(stored)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let key = redis_key(prefix, owner, id);
                let secs = ttl.as_secs().max(1);
                link.retrying("responses", |mut conn| {
                    let (key, body) = (key.clone(), body.clone());
                    async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(body)
                            .arg("EX")
                            .arg(secs)
                            .query_async::<()>(&mut conn)
                            .await
                    }
                })
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))
            }
        }
    }

    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<Stored>, StoreError> {
        match self {
            ResponseStore::Memory(m) => Ok(m.get(owner, id)),
            ResponseStore::Redis { link, prefix } => {
                let key = redis_key(prefix, owner, id);
                let body: Option<String> = link
                    .retrying("responses", |mut conn| {
                        let key = key.clone();
                        async move { redis::cmd("GET").arg(key).query_async(&mut conn).await }
                    })
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
            }
        }
    }

    /// Whether there was one to delete.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<bool, StoreError> {
        match self {
            ResponseStore::Memory(m) => Ok(m.delete(owner, id)),
            ResponseStore::Redis { link, prefix } => {
                let key = redis_key(prefix, owner, id);
                let n: u64 = link
                    .retrying("responses", |mut conn| {
                        let key = key.clone();
                        async move { redis::cmd("DEL").arg(key).query_async(&mut conn).await }
                    })
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Ok(n > 0)
            }
        }
    }
}

fn redis_key(prefix: &str, owner: &str, id: &str) -> String {
    format!("{{{prefix}:responses}}:{}:{owner}:{id}", owner.len())
}

/// Stored responses in this process: at most `max` (the oldest goes first), each until its
/// time is up.
pub struct Memory {
    max: usize,
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Each entry with the generation it was put at.
    entries: HashMap<(String, String), (u64, Instant, Arc<Stored>)>,
    /// Names in the order they were put, with their generation: an entry replaced or deleted
    /// since leaves a stale name here, skipped when it comes up.
    order: VecDeque<((String, String), u64)>,
    generation: u64,
}

impl Memory {
    pub fn new(max: usize) -> Memory {
        Memory {
            max: max.max(1),
            inner: Mutex::new(Table::default()),
        }
    }

    fn put(&self, owner: &str, id: &str, stored: Stored, ttl: Duration) {
        let now = Instant::now();
        let expires = now.checked_add(ttl).unwrap_or(now);
        let name = (owner.to_string(), id.to_string());
        let Ok(mut t) = self.inner.lock() else {
            return;
        };
        t.generation = t.generation.wrapping_add(1);
        let generation = t.generation;
        t.entries
            .insert(name.clone(), (generation, expires, Arc::new(stored)));
        t.order.push_back((name, generation));
        // The oldest go first; stale names cost nothing but their pop.
        while t.entries.len() > self.max || t.order.len() > self.max.saturating_mul(2) {
            let Some((oldest, generation)) = t.order.pop_front() else {
                break;
            };
            if t.entries
                .get(&oldest)
                .is_some_and(|(g, _, _)| *g == generation)
            {
                t.entries.remove(&oldest);
            }
        }
    }

    fn get(&self, owner: &str, id: &str) -> Option<Stored> {
        let name = (owner.to_string(), id.to_string());
        let mut t = self.inner.lock().ok()?;
        match t.entries.get(&name) {
            Some((_, expires, stored)) if *expires > Instant::now() => Some((**stored).clone()),
            Some(_) => {
                t.entries.remove(&name);
                None
            }
            None => None,
        }
    }

    fn delete(&self, owner: &str, id: &str) -> bool {
        let name = (owner.to_string(), id.to_string());
        let Ok(mut t) = self.inner.lock() else {
            return false;
        };
        t.entries
            .remove(&name)
            .is_some_and(|(_, expires, _)| expires > Instant::now())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(n: u64) -> Stored {
        Stored {
            response: json!({"id": format!("resp_{n}"), "output": [{"type": "message", "n": n}]}),
            input: vec![json!({"role": "user", "content": "hi"})],
        }
    }

    #[tokio::test]
    async fn a_response_is_its_owners_only_and_gone_when_deleted() {
        let s = ResponseStore::new(None, 10);
        let hour = Duration::from_secs(3600);
        s.put("alice", "resp_1", &stored(1), hour).await.unwrap();
        assert_eq!(s.get("alice", "resp_1").await.unwrap(), Some(stored(1)));
        assert_eq!(s.get("bob", "resp_1").await.unwrap(), None);
        assert!(!s.delete("bob", "resp_1").await.unwrap());
        assert!(s.delete("alice", "resp_1").await.unwrap());
        assert_eq!(s.get("alice", "resp_1").await.unwrap(), None);
        assert!(!s.delete("alice", "resp_1").await.unwrap());
    }

    #[tokio::test]
    async fn expired_and_oldest_responses_go() {
        let s = ResponseStore::new(None, 3);
        s.put("a", "old", &stored(0), Duration::ZERO).await.unwrap();
        assert_eq!(s.get("a", "old").await.unwrap(), None, "expired");
        for n in 1..=5 {
            s.put("a", &format!("r{n}"), &stored(n), Duration::from_secs(60))
                .await
                .unwrap();
            // A replaced entry does not count twice, nor is it evicted by its stale name.
            s.put("a", "r1", &stored(1), Duration::from_secs(60))
                .await
                .unwrap();
        }
        let mut kept = Vec::new();
        for n in 1..=5 {
            if s.get("a", &format!("r{n}")).await.unwrap().is_some() {
                kept.push(n);
            }
        }
        assert_eq!(kept, vec![1, 4, 5]);
    }

    #[test]
    fn the_history_is_the_input_then_the_output() {
        assert_eq!(
            stored(7).history(),
            vec![
                json!({"role": "user", "content": "hi"}),
                json!({"type": "message", "n": 7})
            ]
        );
    }

    #[test]
    fn owners_never_share_a_redis_key() {
        assert_ne!(redis_key("l", "a:b", "c"), redis_key("l", "a", "b:c"));
        assert_eq!(
            redis_key("lumen", "k1", "resp_9"),
            "{lumen:responses}:2:k1:resp_9"
        );
    }
}
