//! One connection handed to a caller: whichever kind the topology needs (a reconnecting
//! connection to one server, a cluster connection that follows MOVED/ASK, or a plain connection
//! to the master Sentinel named), tagged with the operation it serves so every call is timed
//! and every failure counted under that name (`lumen_redis_latency_seconds{op}`,
//! `lumen_redis_errors_total{op}`).
//!
//! Counting here, not in each policy, means no call can be missed: a call that a caller's
//! timeout drops half-way is counted as failed by [`Call`]'s drop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

/// Told of every Redis call Lumen makes: the gateway's metrics implement it.
pub trait RedisObserver: Send + Sync {
    /// One call under `op` took `elapsed` and failed (`failed`) or answered.
    fn call(&self, op: &'static str, elapsed: Duration, failed: bool);
}

/// What every connection of a link shares: who is told of calls, and which generation of
/// connections is current (Sentinel ends one when the master moved).
pub(crate) struct Shared {
    pub(crate) observer: OnceLock<Arc<dyn RedisObserver>>,
    pub(crate) generation: AtomicU64,
    /// Writes waiting to be sent again ([`super::RedisLink::resend`]).
    pub(crate) resending: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// Ends `generation`: connections made in it are not handed out again. Several callers
    /// seeing the same failover end it once.
    pub(crate) fn forget(&self, generation: u64) {
        let _ = self.generation.compare_exchange(
            generation,
            generation.wrapping_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// The connection itself, by topology.
#[derive(Clone)]
pub(super) enum Inner {
    /// One server (`redis.url`): redis-rs reconnects it in the background.
    Managed(ConnectionManager),
    /// Redis Cluster: routes each command by its key's slot, follows redirects.
    Cluster(ClusterConnection),
    /// One multiplexed connection, not reconnected in place: a connection of its own for
    /// blocking commands, or the master Sentinel named when it was made (after a failover the
    /// old address is wrong, so a broken or demoted one is dropped and the next call asks
    /// Sentinel again).
    Plain(MultiplexedConnection),
}

/// A connection for one operation. Cheap to clone; clones share the socket.
#[derive(Clone)]
pub struct RedisConn {
    inner: Inner,
    op: &'static str,
    shared: Arc<Shared>,
    /// The link's generation this connection was made in (Sentinel drops older ones).
    generation: u64,
    /// Made from Sentinel's answer: an error that says the master moved ends the generation.
    follows_sentinel: bool,
    /// A connection of its own for blocking reads (`XREAD BLOCK`): a call dropped half-way is
    /// a reader that stopped waiting (its client left), not a failure.
    blocking: bool,
}

impl RedisConn {
    pub(super) fn new(
        inner: Inner,
        op: &'static str,
        shared: Arc<Shared>,
        generation: u64,
        follows_sentinel: bool,
        blocking: bool,
    ) -> RedisConn {
        RedisConn {
            inner,
            op,
            shared,
            generation,
            follows_sentinel,
            blocking,
        }
    }
}

/// One call in flight: counted as failed if dropped before it finished (a caller's timeout).
struct Call<'a> {
    op: &'static str,
    shared: &'a Shared,
    generation: u64,
    sentinel: bool,
    started: Instant,
    /// Finished, or dropped where dropping is no failure (a blocking read given up).
    done: bool,
}

impl<'a> Call<'a> {
    /// Splits a connection into the call's record and the socket to send on (disjoint borrows:
    /// no clone of the connection per call).
    fn start(conn: &'a mut RedisConn) -> (Call<'a>, &'a mut Inner) {
        let RedisConn {
            inner,
            op,
            shared,
            generation,
            follows_sentinel,
            blocking,
        } = conn;
        let call = Call {
            op,
            shared,
            generation: *generation,
            sentinel: *follows_sentinel,
            started: Instant::now(),
            done: *blocking,
        };
        (call, inner)
    }

    fn finish<T>(mut self, result: &Result<T, RedisError>) {
        self.done = true;
        let failed = match result {
            Ok(_) => false,
            // EVALSHA of a script this server has not seen yet: redis-rs loads it and calls
            // again at once; `XGROUP CREATE` of a group that exists: the answer its caller
            // expects on every start but the first. Neither is a failure.
            Err(e) => e.kind() != ErrorKind::NoScriptError && e.code() != Some("BUSYGROUP"),
        };
        if let Err(e) = result {
            if failed {
                tracing::debug!(op = self.op, error = %e, "redis call failed");
            }
            if self.sentinel && stale_master(e) {
                self.shared.forget(self.generation);
            }
        }
        self.record(failed);
    }

    fn record(&self, failed: bool) {
        if let Some(observer) = self.shared.observer.get() {
            observer.call(self.op, self.started.elapsed(), failed);
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.record(true);
        }
    }
}

/// Whether an error means the master this connection reached is no longer the master (it died,
/// or Sentinel demoted it and its writes now answer `READONLY`).
pub(super) fn stale_master(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_unrecoverable_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == ErrorKind::ReadOnly
        || e.kind() == ErrorKind::MasterDown
}

/// One place that knows the three kinds of connection; [`RedisConn`] times and counts around it.
impl ConnectionLike for Inner {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Inner::Managed(c) => c.req_packed_command(cmd),
            Inner::Cluster(c) => c.req_packed_command(cmd),
            Inner::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Inner::Managed(c) => c.req_packed_commands(cmd, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Inner::Plain(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Inner::Managed(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
            Inner::Plain(c) => c.get_db(),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (call, inner) = Call::start(self);
            let result = inner.req_packed_command(cmd).await;
            call.finish(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (call, inner) = Call::start(self);
            let result = inner.req_packed_commands(cmd, offset, count).await;
            call.finish(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
