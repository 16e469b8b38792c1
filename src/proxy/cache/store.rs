//! The node's cache: the entry store (memory, and Redis when configured) and the requests in
//! flight that identical requests follow. Built once by the node; a leaf of `proxy::cache`.

use std::sync::Arc;
use std::time::Duration;

use lumen_plugins::cache::flight::Flights;
use lumen_plugins::cache::store::{CacheStore, Entry};
use lumen_plugins::redis_link::RedisLink;

use crate::config::snapshot::CacheSettings;

/// Largest entry sent to Redis: bigger answers stay in this node's memory only.
const REDIS_MAX_ENTRY: usize = 4 * 1024 * 1024;

/// The node's cache: its store and the requests in flight.
pub struct Cache {
    pub store: CacheStore,
    pub flights: Arc<Flights>,
    pub coalesce_wait: Duration,
}

impl Cache {
    pub fn new(settings: &CacheSettings, redis: Option<(Arc<RedisLink>, String)>) -> Cache {
        Cache {
            store: CacheStore::new(
                settings.memory_bytes,
                redis.filter(|_| settings.redis),
                REDIS_MAX_ENTRY,
            ),
            flights: Arc::new(Flights::new()),
            coalesce_wait: settings.coalesce_wait,
        }
    }
}

impl Cache {
    /// Stores answers: in memory at once (the next request hits), in Redis off the request's
    /// path (a failure is counted by the Redis link).
    pub fn keep(self: &Arc<Cache>, entries: Vec<(String, Entry)>) {
        if entries.is_empty() {
            return;
        }
        let entries: Vec<(String, Arc<Entry>)> =
            entries.into_iter().map(|(k, e)| (k, Arc::new(e))).collect();
        self.store.remember(&entries);
        let cache = self.clone();
        tokio::spawn(async move {
            // A failure is counted by the Redis link; the entries stay in memory.
            let _ = cache.store.share(&entries).await;
        });
    }
}
