//! The composition root: everything one node shares across requests, built once, in one place.
//!
//! The Redis link comes first (when `redis:` is configured) and is handed to every part that
//! shares state across the fleet: the limits, the cache, the usage ledger, the job queue and the
//! prober's Redis check. If it cannot be built, one log line says so, and all of them run in
//! this process. The proxy ([`crate::proxy::Gateway`]) and every background service are built
//! from a [`Node`]; `lib.rs` wires services from the node, never from the proxy object.
//!
//! Imports: every layer below `proxy` (config, upstream, jobs, ledger, the plugins) and the
//! cache store of `proxy::cache`; nothing imports this module but `lib` and `proxy`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use lumen_plugins::rate_limit::shared::{OnRedisError, SharedLimiter};
use lumen_plugins::redis_link::RedisLink;

use crate::config::Snapshot;
use crate::drain::Drain;
use crate::jobs::Jobs;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::proxy::cache::store::Cache;
use crate::telemetry::{SpanCounters, Telemetry};
use crate::upstream::health::quota::Quotas;
use crate::upstream::health::HealthTable;

/// The fleet's shared Redis, as this node reached it at start-up. Its settings are read once: a
/// new URL needs a restart (sockets are process state).
pub struct Redis {
    pub link: Arc<RedisLink>,
    /// Every key this node writes starts with it (`redis.prefix`).
    pub prefix: String,
    /// What a request does when Redis fails (`redis.on_error`).
    pub on_error: OnRedisError,
    /// Request and token limits shared through the link.
    pub limits: Arc<SharedLimiter>,
    /// Dollar budgets shared through the link.
    pub budgets: Arc<lumen_plugins::budget::shared::SharedBudgets>,
    /// This node's share of each dollar budget while Redis is down (fail-open).
    pub local_budget_share: f64,
}

/// One node's shared state. Cheap to share: everything is behind an `Arc`.
pub struct Node {
    /// The live config; each request loads it once and keeps that snapshot to the end.
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// `None` without `redis:` (or with a URL that could not be used): everything in process.
    pub redis: Option<Redis>,
    /// Upstream health (probes, circuits, provider limits): outlives config reloads.
    pub health: Arc<HealthTable>,
    /// Provider quotas (`quota:` on providers), counted per attempt.
    pub quotas: Arc<Quotas>,
    /// The response cache (memory, and Redis when configured) and requests in flight.
    pub cache: Arc<Cache>,
    /// Usage per key, provider, model and day (file or Redis).
    pub ledger: Arc<Ledger>,
    /// Async jobs: the queue and table this node's API and workers share.
    pub jobs: Arc<Jobs>,
    /// Files and batches (the Batch API), driven on the job engine.
    pub batches: Arc<crate::batches::Batches>,
    /// Shutdown: open streams end when it says so (`drain::Drainer`).
    pub drain: Arc<Drain>,
    /// Stored responses (the Responses API's `store`): in Redis when configured.
    pub responses: Arc<crate::stored::ResponseStore>,
    /// Dollar budgets in this process: every budget without `redis:`; with it, this node's
    /// share while Redis is down (fail-open). Outlives reloads.
    pub budgets: Arc<lumen_plugins::budget::LocalBudgets>,
    /// OpenTelemetry traces (`tracing:`, read at start-up); `None`: off.
    pub telemetry: Option<Arc<Telemetry>>,
}

impl Node {
    /// Builds the node's shared state from the live config.
    pub fn new(config: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Node {
        let snapshot = config.load_full();
        let redis =
            snapshot
                .redis
                .as_ref()
                .and_then(|r| match RedisLink::with_settings(r.link.clone()) {
                    Ok(link) => {
                        let link = Arc::new(link);
                        link.observe(metrics.clone());
                        Some(Redis {
                            limits: Arc::new(SharedLimiter::new(link.clone(), &r.prefix)),
                            budgets: Arc::new(lumen_plugins::budget::shared::SharedBudgets::new(
                                link.clone(),
                                &r.prefix,
                            )),
                            local_budget_share: r.local_budget_share,
                            link,
                            prefix: r.prefix.clone(),
                            on_error: r.on_error,
                        })
                    }
                    Err(e) => {
                        tracing::error!(
                            error = %e,
                            "redis unusable: limits, cache, usage and jobs run in this process only"
                        );
                        None
                    }
                });
        let link = redis.as_ref().map(|r| (r.link.clone(), r.prefix.clone()));
        let health = Arc::new(HealthTable::new());
        health.sync(snapshot.providers.values());
        let jobs = Arc::new(Jobs::new(
            snapshot.jobs.clone(),
            link.clone(),
            metrics.clone(),
        ));
        let telemetry = snapshot.tracing.as_ref().and_then(|t| {
            let result = |r| metrics.otel_spans.with_label_values(&[r]);
            let counters = SpanCounters {
                exported: result("exported"),
                failed: result("failed"),
                dropped: result("dropped"),
            };
            match Telemetry::start(t, counters) {
                Ok(telemetry) => Some(telemetry),
                Err(e) => {
                    tracing::error!(error = %e, "traces are off");
                    None
                }
            }
        });
        Node {
            telemetry,
            quotas: Arc::new(Quotas::new(redis.as_ref().map(|r| r.limits.clone()))),
            cache: Arc::new(Cache::new(&snapshot.cache, link.clone())),
            ledger: Arc::new(Ledger::new(&snapshot.usage, link.clone())),
            responses: Arc::new(crate::stored::ResponseStore::new(
                link.clone(),
                snapshot.responses.max_stored,
            )),
            jobs: jobs.clone(),
            batches: Arc::new(crate::batches::Batches::new(
                snapshot.batches.clone(),
                &snapshot.usage.state_dir,
                link,
                jobs,
            )),
            health,
            redis,
            drain: Arc::new(Drain::default()),
            budgets: Arc::new(lumen_plugins::budget::LocalBudgets::default()),
            config,
            metrics,
        }
    }

    /// The limits shared through Redis, when configured.
    pub fn shared_limits(&self) -> Option<Arc<SharedLimiter>> {
        self.redis.as_ref().map(|r| r.limits.clone())
    }
}

impl AsRef<Node> for Node {
    fn as_ref(&self) -> &Node {
        self
    }
}
