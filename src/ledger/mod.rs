//! Usage accounting: requests, prompt and completion tokens, errors and cache hits per key,
//! provider, model and (UTC) day, kept across restarts and, with `redis:`, across the fleet.
//!
//! The request path only adds to a small in-memory table ([`Ledger::record`]): one of several
//! shards picked by thread, each behind its own mutex held for one hash-map update, so workers
//! do not contend on one lock and nothing waits on disk or Redis. A background task
//! ([`Flusher`]) moves what was counted into the store every `usage.flush_interval` and on
//! shutdown:
//! - **file** (no `redis:`): `usage.json` in the state directory, read, added to and replaced
//!   atomically under an advisory lock, so two processes (an upgrade's old and new) add up
//!   instead of overwriting each other;
//! - **Redis**: one hash per day, incremented by a script that applies each batch once (a
//!   retried batch after a lost reply is not counted twice). What cannot reach Redis stays in
//!   memory for the next flush, and on shutdown is spooled to the state directory and sent at
//!   the next start.
//!
//! Reads ([`Ledger::query`]) add what is stored to what is still in memory, so `/admin/usage`
//! is exact at any moment, not only after a flush.
//!
//! Imports: `config`'s usage settings and the plugins' Redis link; nothing of the request path.

mod day;
mod row;
mod store;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use crate::config::snapshot::UsageSettings;
use crate::config::Snapshot;
use lumen_plugins::redis_link::RedisLink;

pub use day::Day;
use row::Batch;
pub use row::{Counts, RowKey};
use store::Store;
pub use store::StoreError;

/// Rows one shard holds between flushes before new (key, provider, model) combinations are
/// counted under one `_other` row: a bound on memory against clients that send a new model
/// name every request to a passthrough route.
const MAX_ROWS_PER_SHARD: usize = 20_000;
const SHARDS: usize = 16;

/// One finished request, as the pipeline saw it.
pub struct Event<'a> {
    pub key: &'a str,
    /// The caller's tenant; empty when it has none.
    pub tenant: &'a str,
    /// The provider that answered (for a cache hit, the one whose answer was cached); empty
    /// when none did.
    pub provider: &'a str,
    /// The model the client asked for.
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What it cost at the configured prices, in micro-dollars.
    pub cost_micros: u64,
    pub error: bool,
    pub cache_hit: bool,
}

/// One shard of what was counted since the last flush: rows by hash (collisions share a vec),
/// so a lookup allocates nothing.
#[derive(Default)]
struct Shard {
    rows: HashMap<u64, Vec<(RowKey, Counts)>>,
    len: usize,
    /// Requests counted while the shard was full (see `MAX_ROWS_PER_SHARD`), by day.
    overflow: Counts,
    overflow_day: Option<Day>,
}

impl Shard {
    /// Empties the shard into `into`.
    fn drain_into(&mut self, into: &mut Batch) {
        for (_, rows) in self.rows.drain() {
            for (k, v) in rows {
                into.entry(k).or_default().add(&v);
            }
        }
        self.len = 0;
        if self.overflow != Counts::default() {
            let row = RowKey::other(self.overflow_day.unwrap_or_else(Day::today));
            into.entry(row).or_default().add(&self.overflow);
            self.overflow = Counts::default();
            self.overflow_day = None;
        }
    }
}

/// A query's filters; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub key: Option<String>,
    pub tenant: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Inclusive day range.
    pub from: Option<Day>,
    pub to: Option<Day>,
}

impl Filter {
    fn matches(&self, row: &RowKey, from: Day, to: Day) -> bool {
        row.day >= from
            && row.day <= to
            && self.key.as_deref().is_none_or(|k| k == &*row.key)
            && self.tenant.as_deref().is_none_or(|t| t == &*row.tenant)
            && self.provider.as_deref().is_none_or(|p| p == &*row.provider)
            && self.model.as_deref().is_none_or(|m| m == &*row.model)
    }
}

/// The most days one query may span (bounds the work a Redis-backed read does).
pub const MAX_QUERY_DAYS: u32 = 400;

/// What [`Ledger::query`] answers.
pub struct Report {
    pub from: Day,
    pub to: Day,
    pub rows: Vec<(RowKey, Counts)>,
    /// Set when the store could not be read; rows then hold only what is in memory.
    pub store_error: Option<String>,
}

/// The node's usage ledger.
pub struct Ledger {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
    /// Batches taken out of the shards and not yet stored.
    in_transit: Mutex<Vec<(u64, Batch)>>,
    store: Store,
    /// The last flush's failure, for `/admin/usage` (and logged once per change).
    last_error: Mutex<Option<String>>,
    next_shard: AtomicUsize,
    retention_days: u32,
    /// One flush at a time: two at once would both store the batches in transit (the
    /// periodic flusher and the drainer's last flush meet at shutdown).
    flushing: tokio::sync::Mutex<()>,
}

thread_local! {
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

impl Ledger {
    /// A ledger per `usage:`; with `redis` (link, prefix) the fleet shares it.
    pub fn new(settings: &UsageSettings, redis: Option<(Arc<RedisLink>, String)>) -> Ledger {
        let store = match (settings.enabled, redis) {
            (false, _) => Store::Off,
            (true, Some((link, prefix))) => Store::redis(link, &prefix, &settings.state_dir),
            (true, None) => Store::file(&settings.state_dir),
        };
        let ledger = Ledger {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            flushing: tokio::sync::Mutex::new(()),
            hasher: std::hash::RandomState::new(),
            in_transit: Mutex::new(Vec::new()),
            store,
            last_error: Mutex::new(None),
            next_shard: AtomicUsize::new(0),
            retention_days: settings.retention_days,
        };
        // A spool left by a run that could not reach Redis at shutdown: send it with the next
        // flush.
        match ledger.store.take_spool() {
            Ok(Some(batch)) => ledger.lock_transit().push((fastrand::u64(..), batch)),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "usage spool could not be read"),
        }
        if let Err(e) = ledger.store.check() {
            tracing::error!(error = %e, "usage ledger cannot be written; counting in memory only");
            *ledger.lock_error() = Some(e.to_string());
        }
        ledger
    }

    /// `file`, `redis`, or `off`.
    pub fn backend(&self) -> &'static str {
        self.store.label()
    }

    /// Counts one request. Called once per request, after its response.
    pub fn record(&self, event: &Event<'_>) {
        if matches!(self.store, Store::Off) {
            return;
        }
        let counts = Counts {
            requests: 1,
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            errors: u64::from(event.error),
            cache_hits: u64::from(event.cache_hit),
            cost_micros: event.cost_micros,
        };
        let day = Day::today();
        let hash =
            self.hasher
                .hash_one((day, event.key, event.tenant, event.provider, event.model));
        let mut guard = self.shard().lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *guard;
        // Found by hash without allocating: the common case is a row that already exists.
        let rows = shard.rows.entry(hash).or_default();
        if let Some((_, found)) = rows.iter_mut().find(|(k, _)| {
            k.day == day
                && &*k.key == event.key
                && &*k.tenant == event.tenant
                && &*k.provider == event.provider
                && &*k.model == event.model
        }) {
            found.add(&counts);
            return;
        }
        if shard.len >= MAX_ROWS_PER_SHARD {
            // Full: counted, but under one catch-all row.
            shard.overflow.add(&counts);
            shard.overflow_day.get_or_insert(day);
            return;
        }
        rows.push((
            RowKey {
                day,
                key: event.key.into(),
                tenant: event.tenant.into(),
                provider: event.provider.into(),
                model: event.model.into(),
            },
            counts,
        ));
        shard.len += 1;
    }

    fn shard(&self) -> &Mutex<Shard> {
        let i = SHARD.with(|s| {
            if s.get() == usize::MAX {
                s.set(self.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            s.get()
        });
        &self.shards[i % self.shards.len()]
    }

    fn lock_transit(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Batch)>> {
        self.in_transit.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves everything counted so far into the store. One flush at a time (the flusher's
    /// task); what fails stays in transit for the next one.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _one = self.flushing.lock().await;
        let mut batch = Batch::new();
        for shard in self.shards.iter() {
            shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain_into(&mut batch);
        }
        if !batch.is_empty() {
            self.lock_transit().push((fastrand::u64(..), batch));
        }
        let pending: Vec<(u64, Batch)> = self.lock_transit().clone();
        let mut result = Ok(());
        for (id, batch) in pending {
            match self.store.add(id, &batch, self.retention_days).await {
                Ok(()) => self.lock_transit().retain(|(i, _)| *i != id),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.note(&result);
        result
    }

    /// Last words before exit: flush, and spool what the store would not take.
    pub async fn shutdown(&self) {
        if self.flush().await.is_err() {
            let _one = self.flushing.lock().await;
            let mut all = Batch::new();
            for (_, batch) in self.lock_transit().drain(..) {
                merge(&mut all, batch);
            }
            match self.store.spool(&all) {
                Ok(()) => tracing::warn!(
                    rows = all.len(),
                    "usage store unreachable at shutdown: spooled to the state directory, sent at the next start"
                ),
                Err(e) => tracing::error!(error = %e, rows = all.len(), "usage lost at shutdown"),
            }
        }
    }

    fn note(&self, result: &Result<(), StoreError>) {
        let mut last = self.lock_error();
        match result {
            Ok(()) => {
                if last.take().is_some() {
                    tracing::info!("usage ledger written again");
                }
            }
            Err(e) => {
                let message = e.to_string();
                if last.as_deref() != Some(message.as_str()) {
                    tracing::error!(error = %message, "usage ledger could not be written; kept in memory, retried");
                }
                *last = Some(message);
            }
        }
    }

    /// The rows matching `filter` (days default to today), stored and in memory together.
    pub async fn query(&self, filter: &Filter) -> Report {
        let today = Day::today();
        let to = filter.to.unwrap_or(today);
        let from = filter.from.unwrap_or(to);
        let (stored, store_error) = match self.store.read(from, to).await {
            Ok(rows) => (rows, self.lock_error().clone()),
            Err(e) => (Batch::new(), Some(e.to_string())),
        };
        let mut all = stored;
        for (_, batch) in self.lock_transit().iter() {
            merge(&mut all, batch.clone());
        }
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in shard.rows.values().flatten() {
                all.entry(k.clone()).or_default().add(v);
            }
            if let Some(day) = shard.overflow_day {
                let row = RowKey::other(day);
                all.entry(row).or_default().add(&shard.overflow);
            }
        }
        let mut rows: Vec<(RowKey, Counts)> = all
            .into_iter()
            .filter(|(k, _)| filter.matches(k, from, to))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        Report {
            from,
            to,
            rows,
            store_error,
        }
    }
}

fn merge(into: &mut Batch, from: Batch) {
    for (k, v) in from {
        into.entry(k).or_default().add(&v);
    }
}

/// Flushes the ledger every `usage.flush_interval` (read live) and once more on shutdown,
/// then keeps flushing briefly so requests finishing in the grace period are counted too.
pub struct Flusher {
    pub ledger: Arc<Ledger>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[async_trait]
impl pingora::services::background::BackgroundService for Flusher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        if self.ledger.backend() == "off" {
            return;
        }
        loop {
            let every = self.config.load().usage.flush_interval;
            tokio::select! {
                _ = tokio::time::sleep(every) => {
                    let result = if self.ledger.flush().await.is_ok() { "ok" } else { "error" };
                    self.metrics.usage_flushes.with_label_values(&[result]).inc();
                }
                _ = shutdown.changed() => break,
            }
        }
        // Draining: in-flight requests may still finish. Pingora stops this runtime after the
        // grace period; each pass spools what the store refuses.
        loop {
            self.ledger.shutdown().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests;
