//! The node's cache: the entry store (memory, and Redis when configured) and the requests in
//! flight that identical requests follow. Built once by the node; a leaf of `proxy::cache`.

use std::sync::Arc;
use std::time::Duration;

use lumen_plugins::cache::flight::Flights;
use lumen_plugins::cache::store::CacheStore;
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
