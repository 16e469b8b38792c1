//! Where cached answers live: memory first (bounded by total bytes, per-entry TTL, TinyLFU
//! admission and eviction, from `moka`), then Redis when configured (shared by every node,
//! TTL kept by Redis, a size cap per entry). A Redis hit is copied into memory.
//!
//! Redis errors never fail a request: a lookup that cannot reach Redis is a miss, a store
//! that cannot reach it is skipped; the caller counts them.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::redis_link::{RedisLink, SharedError};

/// One stored answer: the non-stream JSON body and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub body: Bytes,
    /// When it was stored (unix ms): `Age` on hits.
    pub created_ms: u64,
    /// How long it lives from `created_ms`.
    pub ttl_ms: u64,
    /// The provider that answered (`x-lumen-provider` on hits).
    pub provider: String,
}

/// Wall-clock ms: entries move between nodes through Redis, so ages use the shared clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Entry {
    pub fn new(body: Bytes, ttl: Duration, provider: &str) -> Entry {
        Entry {
            body,
            created_ms: now_ms(),
            ttl_ms: ttl.as_millis() as u64,
            provider: provider.to_string(),
        }
    }

    /// Whole seconds since it was stored.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.created_ms) / 1000
    }

    fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(
            self.created_ms
                .saturating_add(self.ttl_ms)
                .saturating_sub(now_ms),
        )
    }

    /// `created (8) | ttl (8) | provider length (1) | provider | body`.
    fn encode(&self) -> Vec<u8> {
        let provider = self.provider.as_bytes();
        let provider = provider.get(..255).unwrap_or(provider);
        let mut out = Vec::with_capacity(
            17usize
                .saturating_add(provider.len())
                .saturating_add(self.body.len()),
        );
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.ttl_ms.to_be_bytes());
        out.push(provider.len() as u8);
        out.extend_from_slice(provider);
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(raw: &[u8]) -> Option<Entry> {
        let created_ms = u64::from_be_bytes(raw.get(0..8)?.try_into().ok()?);
        let ttl_ms = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
        let len = usize::from(*raw.get(16)?);
        let provider = std::str::from_utf8(raw.get(17..17 + len)?)
            .ok()?
            .to_string();
        Some(Entry {
            body: Bytes::copy_from_slice(raw.get(17 + len..)?),
            created_ms,
            ttl_ms,
            provider,
        })
    }
}

/// Per-entry expiry: each route has its own TTL, carried by the entry.
struct EntryExpiry;

impl moka::Expiry<String, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Arc<Entry>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.remaining(now_ms()))
    }
}

/// Which tier answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Redis,
}

/// The cache's two tiers.
pub struct CacheStore {
    memory: moka::sync::Cache<String, Arc<Entry>>,
    redis: Option<(Arc<RedisLink>, String)>,
    /// Entries larger than this never go to Redis (one big answer must not stall the link).
    redis_max_entry: usize,
}

impl CacheStore {
    /// A store of at most `memory_bytes` in memory, and Redis under `prefix` when given.
    pub fn new(
        memory_bytes: u64,
        redis: Option<(Arc<RedisLink>, String)>,
        redis_max_entry: usize,
    ) -> CacheStore {
        let memory = moka::sync::Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|key: &String, entry: &Arc<Entry>| {
                key.len()
                    .saturating_add(entry.body.len())
                    .saturating_add(entry.provider.len())
                    .saturating_add(64)
                    .try_into()
                    .unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .build();
        CacheStore {
            memory,
            redis,
            redis_max_entry,
        }
    }

    fn redis_key(prefix: &str, key: &str) -> String {
        format!("{prefix}:cache:{key}")
    }

    /// Looks `key` up in memory, then Redis. `Err` only reports a Redis failure (the lookup
    /// then counts as a miss).
    pub async fn get(&self, key: &str) -> Result<Option<(Arc<Entry>, Tier)>, SharedError> {
        if let Some(entry) = self.memory.get(key) {
            return Ok(Some((entry, Tier::Memory)));
        }
        let Some((link, prefix)) = &self.redis else {
            return Ok(None);
        };
        let mut conn = link.connection("cache").await?;
        let cmd = {
            let mut c = redis::cmd("GET");
            c.arg(Self::redis_key(prefix, key));
            c
        };
        let raw: Option<Vec<u8>> = link.within(cmd.query_async(&mut conn)).await?;
        Ok(self.admit_from_redis(key, raw).map(|e| (e, Tier::Redis)))
    }

    /// Looks up several keys: memory first, the rest in one Redis round trip. A Redis failure
    /// leaves the rest as misses and is reported alongside.
    pub async fn get_many(
        &self,
        keys: &[String],
    ) -> (Vec<Option<Arc<Entry>>>, Option<SharedError>) {
        let mut found: Vec<Option<Arc<Entry>>> = keys.iter().map(|k| self.memory.get(k)).collect();
        let Some((link, prefix)) = &self.redis else {
            return (found, None);
        };
        if found.iter().all(Option::is_some) {
            return (found, None);
        }
        let mut cmd = redis::cmd("MGET");
        for (key, _) in keys.iter().zip(&found).filter(|(_, hit)| hit.is_none()) {
            cmd.arg(Self::redis_key(prefix, key));
        }
        let raws: Vec<Option<Vec<u8>>> = match link.connection("cache").await {
            Ok(mut conn) => match link.within(cmd.query_async(&mut conn)).await {
                Ok(raws) => raws,
                Err(e) => return (found, Some(e)),
            },
            Err(e) => return (found, Some(e)),
        };
        // MGET answers in the order asked: the misses, in order.
        let misses = found
            .iter_mut()
            .zip(keys)
            .filter(|(slot, _)| slot.is_none());
        for ((slot, key), raw) in misses.zip(raws) {
            *slot = self.admit_from_redis(key, raw);
        }
        (found, None)
    }

    fn admit_from_redis(&self, key: &str, raw: Option<Vec<u8>>) -> Option<Arc<Entry>> {
        let entry = Arc::new(Entry::decode(&raw?)?);
        if entry.remaining(now_ms()).is_zero() {
            return None;
        }
        self.memory.insert(key.to_string(), entry.clone());
        Some(entry)
    }

    /// Stores in memory and, when configured and small enough, in Redis.
    pub async fn put(&self, key: String, entry: Entry) -> Result<(), SharedError> {
        self.put_many(vec![(key, entry)]).await
    }

    /// Stores several entries; Redis gets them in one pipelined round trip.
    pub async fn put_many(&self, entries: Vec<(String, Entry)>) -> Result<(), SharedError> {
        let entries: Vec<(String, Arc<Entry>)> =
            entries.into_iter().map(|(k, e)| (k, Arc::new(e))).collect();
        self.remember(&entries);
        self.share(&entries).await
    }

    /// The memory half of a store: at once, so the very next request can hit.
    pub fn remember(&self, entries: &[(String, Arc<Entry>)]) {
        for (key, entry) in entries {
            self.memory.insert(key.clone(), entry.clone());
        }
    }

    /// The Redis half of a store (nothing without Redis): one `SET` per entry, all sent at
    /// once on the multiplexed connection. Not one pipeline: entries' keys hash to different
    /// slots, and on a Redis Cluster a pipeline must stay in one.
    pub async fn share(&self, entries: &[(String, Arc<Entry>)]) -> Result<(), SharedError> {
        let Some((link, prefix)) = &self.redis else {
            return Ok(());
        };
        let sets: Vec<redis::Cmd> = entries
            .iter()
            .filter(|(_, entry)| entry.body.len() <= self.redis_max_entry)
            .map(|(key, entry)| {
                let ttl = entry.remaining(now_ms()).as_millis().max(1) as u64;
                let mut set = redis::cmd("SET");
                set.arg(Self::redis_key(prefix, key))
                    .arg(entry.encode())
                    .arg("PX")
                    .arg(ttl);
                set
            })
            .collect();
        if sets.is_empty() {
            return Ok(());
        }
        let conn = link.connection("cache").await?;
        let calls = sets.iter().map(|set| {
            let mut conn = conn.clone();
            async move { set.query_async::<()>(&mut conn).await }
        });
        link.within(async {
            futures_util::future::join_all(calls)
                .await
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(|_| ())
        })
        .await
    }

    /// Bytes held in memory (moka's weighted size, after pending maintenance).
    pub fn memory_bytes(&self) -> u64 {
        self.memory.run_pending_tasks();
        self.memory.weighted_size()
    }

    pub fn memory_entries(&self) -> u64 {
        self.memory.run_pending_tasks();
        self.memory.entry_count()
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

    #[test]
    fn entries_round_trip_through_their_encoding() {
        let e = Entry::new(
            Bytes::from_static(b"{\"x\":1}"),
            Duration::from_secs(60),
            "groq",
        );
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(b"short"), None);
    }

    #[tokio::test]
    async fn memory_tier_hits_expires_and_stays_within_its_bound() {
        let store = CacheStore::new(64 * 1024, None, 1 << 20);
        let e = Entry::new(Bytes::from_static(b"{}"), Duration::from_millis(150), "p");
        store.put("k".into(), e.clone()).await.unwrap();
        let (hit, tier) = store.get("k").await.unwrap().expect("hit");
        assert_eq!(*hit, e);
        assert_eq!(tier, Tier::Memory);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(store.get("k").await.unwrap().is_none(), "expired");

        let big = Bytes::from(vec![b'x'; 4096]);
        for i in 0..200 {
            let e = Entry::new(big.clone(), Duration::from_secs(60), "p");
            store.put(format!("k{i}"), e).await.unwrap();
        }
        assert!(
            store.memory_bytes() <= 64 * 1024,
            "{}",
            store.memory_bytes()
        );
        assert!(store.memory_entries() < 200);
    }
}
