//! The gateway: the [`Gateway`] type and what it holds. Its methods live one concern per file
//! beside this one (`admit`, `limits`, `respond`, `observe`, `jobs`, `cache/`), as
//! pingora-proxy splits its own proxy; the request's phases are in `mod.rs`, the HTTP service
//! that runs them in `frame.rs`. A leaf of `proxy`: every other file of it imports this one, never the reverse.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use lumen_plugins::address::AddressLimiter;
use lumen_plugins::rate_limit::shared::SharedLimiter;
use lumen_plugins::rate_limit::LocalLimiter;

use super::forward::{Forwarder, Upstreams};
use crate::config::Snapshot;
use crate::drain::Drain;
use crate::jobs::Jobs;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::upstream::health::HealthTable;

/// The gateway as a Pingora proxy application. Cheap to share: all state is behind `Arc`s.
pub struct Gateway {
    /// The live config; each request loads it once and keeps that snapshot to the end.
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// What this node shares across requests: health, quotas, cache, ledger, jobs, Redis.
    pub(super) node: Arc<Node>,
    /// Rate-limit state: outside the config snapshot, so counters survive reloads. Shared
    /// with this gateway's [`siblings`](Gateway::sibling), so a key's limit is the node's.
    pub(super) limiter: Arc<LocalLimiter>,
    /// Request counts per client address (`limits.per_ip`), in fixed memory.
    pub(super) addresses: Arc<AddressLimiter>,
    /// Last time (ms since `started`) a Redis failure was logged: once per burst, not per request.
    pub(super) redis_logged_ms: Arc<AtomicU64>,
    pub(super) started: Instant,
    /// The upstream side: a pool of keep-alive connections, this gateway's own (each thread's,
    /// in `runtime: per_core`: a pooled connection is registered with the I/O driver of the
    /// runtime that opened it, so sharing one pool across runtimes wakes another thread on
    /// every read).
    pub(super) forwarder: Forwarder,
    /// This process's jobs socket: the only listener on which a job token means anything.
    pub(super) internal_socket: std::path::PathBuf,
    /// Connections for asking a sidecar target to count a prompt's tokens (`admit`).
    pub(super) counter: Arc<pingora::connectors::http::Connector>,
}

impl Gateway {
    /// A gateway with a node of its own, built from the live config.
    pub fn new(config: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Gateway {
        Gateway::on(Arc::new(Node::new(config, metrics)))
    }

    /// The proxy of `node`, sharing its state with the node's background services.
    pub fn on(node: Arc<Node>) -> Gateway {
        Gateway {
            config: node.config.clone(),
            metrics: node.metrics.clone(),
            node,
            limiter: Arc::new(LocalLimiter::new()),
            addresses: Arc::new(AddressLimiter::new()),
            redis_logged_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            forwarder: Forwarder::new(),
            internal_socket: crate::jobs::run::socket_path(),
            counter: Arc::new(pingora::connectors::http::Connector::new(None)),
        }
    }

    /// Another proxy over the same node and the same limits, with an upstream pool of its
    /// own: one per runtime in `runtime: per_core`.
    pub fn sibling(&self) -> Gateway {
        Gateway {
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            node: self.node.clone(),
            limiter: self.limiter.clone(),
            addresses: self.addresses.clone(),
            redis_logged_ms: self.redis_logged_ms.clone(),
            started: self.started,
            forwarder: Forwarder::new(),
            internal_socket: self.internal_socket.clone(),
            counter: Arc::new(pingora::connectors::http::Connector::new(None)),
        }
    }

    /// The node this gateway serves for.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The shutdown state this gateway's streams watch.
    pub fn drain(&self) -> Arc<Drain> {
        self.node.drain.clone()
    }

    /// The async jobs of this node (its workers run them).
    pub fn jobs(&self) -> Arc<Jobs> {
        self.node.jobs.clone()
    }

    /// The usage ledger; the admin service reads it, the flusher writes it out.
    pub fn ledger(&self) -> Arc<Ledger> {
        self.node.ledger.clone()
    }

    /// The health table this gateway routes by; the prober and the admin service share it.
    pub fn health(&self) -> Arc<HealthTable> {
        self.node.health.clone()
    }

    /// The Redis connection used for shared limits, when configured.
    pub fn redis(&self) -> Option<Arc<SharedLimiter>> {
        self.node.shared_limits()
    }

    /// What the forwarder reads and feeds.
    pub(super) fn upstreams(&self) -> Upstreams<'_> {
        Upstreams {
            health: &self.node.health,
            quotas: &self.node.quotas,
            metrics: &self.metrics,
            drain: &self.node.drain,
            settle: self,
        }
    }
}

impl AsRef<Node> for Gateway {
    fn as_ref(&self) -> &Node {
        &self.node
    }
}
