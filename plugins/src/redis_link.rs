//! The Redis connections shared by every policy that keeps state in Redis (shared limits, the
//! cache, the ledger, jobs): one multiplexed connection per tokio runtime, made lazily and
//! re-made in the background by redis-rs's `ConnectionManager`.
//!
//! One per runtime, not one per node: a connection's reader and writer run as a task on the
//! runtime that made it, so with `server.runtime: per_core` (one single-threaded runtime per
//! thread) a single shared connection made every other thread's Redis call wait for that one
//! thread to be scheduled, and under load calls missed `redis.timeout` and fell back. Finding
//! the caller's connection is one lock-free `arc-swap` load; only making one takes a lock.
//!
//! While no connection can be made, calls fail fast (once a second a new attempt), so Redis
//! being down costs a request nothing but the fallback its policy chooses.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::runtime::Handle;
use tokio::sync::Mutex as AsyncMutex;

/// Connections kept for runtimes at most. A process has a handful of runtimes (the proxy's, one
/// per core with `per_core`, the background services'); ids are never reused, so a runtime that
/// ended leaves an entry behind until this many newer ones push it out.
const MAX_RUNTIMES: usize = 64;

/// The connection made on one runtime (`None`: called from outside any runtime).
struct Made {
    runtime: Option<tokio::runtime::Id>,
    conn: ConnectionManager,
}

/// Why Redis gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is unreachable; next connection attempt in under a second")]
    Backoff,
}

/// The connections and the time budget every call gets.
pub struct RedisLink {
    client: redis::Client,
    /// Longest wait for one call.
    pub timeout: Duration,
    conns: ArcSwap<Vec<Made>>,
    /// Held only while a connection is being made, so two callers on one runtime make one.
    making: AsyncMutex<()>,
    /// Monotonic ms (since `epoch`) before which no new connection is attempted.
    retry_at_ms: AtomicU64,
    epoch: Instant,
}

impl RedisLink {
    /// `url` like `redis://127.0.0.1:6379`; nothing is connected until the first call.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisLink, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid redis url: {e}"))?;
        Ok(RedisLink {
            client,
            timeout,
            conns: ArcSwap::from_pointee(Vec::new()),
            making: AsyncMutex::new(()),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// A handle on the calling runtime's connection (a cheap clone), making it if needed.
    pub async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        let runtime = Handle::try_current().ok().map(|h| h.id());
        if let Some(conn) = self.made_on(runtime) {
            return Ok(conn);
        }
        let _making = self.making.lock().await;
        if let Some(conn) = self.made_on(runtime) {
            return Ok(conn);
        }
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if now_ms < self.retry_at_ms.load(Ordering::Acquire) {
            return Err(SharedError::Backoff);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(200)))
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(Ok(conn)) => {
                self.conns.rcu(|made| {
                    let keep = made.len().saturating_sub(MAX_RUNTIMES.saturating_sub(1));
                    let mut next: Vec<Made> = made
                        .iter()
                        .skip(keep)
                        .map(|m| Made {
                            runtime: m.runtime,
                            conn: m.conn.clone(),
                        })
                        .collect();
                    next.push(Made {
                        runtime,
                        conn: conn.clone(),
                    });
                    Arc::new(next)
                });
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.retry_at_ms
                    .store(now_ms.saturating_add(1000), Ordering::Release);
                Err(e.into())
            }
            Err(_) => {
                self.retry_at_ms
                    .store(now_ms.saturating_add(1000), Ordering::Release);
                Err(SharedError::Timeout(self.timeout))
            }
        }
    }

    fn made_on(&self, runtime: Option<tokio::runtime::Id>) -> Option<ConnectionManager> {
        self.conns
            .load()
            .iter()
            .find(|m| m.runtime == runtime)
            .map(|m| m.conn.clone())
    }

    /// A connection of its own, for blocking commands (`XREADGROUP BLOCK`, `XREAD BLOCK`) that
    /// would hold up everyone else's calls on the shared one.
    pub async fn dedicated(&self) -> Result<redis::aio::MultiplexedConnection, SharedError> {
        let wait = self.timeout.max(Duration::from_millis(500));
        match tokio::time::timeout(wait, self.client.get_multiplexed_async_connection()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SharedError::Timeout(wait)),
        }
    }

    /// Runs one call within the link's timeout.
    pub async fn within<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        Ok(tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))??)
    }

    /// Runs `op` on the calling runtime's connection within the link's timeout, and once more
    /// if the connection turned out to be dead, while time is left.
    ///
    /// After Redis restarts, every connection learns it is dead on its next call: redis-rs
    /// fails that call (and every call already waiting on the same connection) and starts a
    /// new one. Without the second try a concurrent burst right after a restart would all fall
    /// back to each node's local bucket. Only for commands where running twice errs on the
    /// safe side (a call that reached Redis before the connection broke may have run): taking
    /// a slot or reserving counts more, never less.
    pub async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, SharedError>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            let mut retried = false;
            loop {
                let conn = self.connection().await?;
                match op(conn).await {
                    Err(e) if !retried && (e.is_unrecoverable_error() || e.is_io_error()) => {
                        tracing::debug!(error = %e, "redis connection was dead; one more try on its replacement");
                        retried = true;
                    }
                    result => return result.map_err(SharedError::from),
                }
            }
        };
        tokio::time::timeout(self.timeout, attempts)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))?
    }
}
