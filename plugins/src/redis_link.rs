//! One lazily made, self-healing Redis connection shared by every policy that keeps state in
//! Redis (shared limits, the cache), so a node holds one multiplexed connection, not one per
//! feature.
//!
//! The connection is made on first use and re-made in the background by redis-rs's
//! `ConnectionManager`; while none can be made, calls fail fast (once a second a new attempt),
//! so Redis being down costs a request nothing but the fallback its policy chooses.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex as AsyncMutex;

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

/// The connection and the time budget every call gets.
pub struct RedisLink {
    client: redis::Client,
    /// Longest wait for one call.
    pub timeout: Duration,
    conn: AsyncMutex<Option<ConnectionManager>>,
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
            conn: AsyncMutex::new(None),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// A handle on the shared connection (a cheap clone), making it if needed.
    pub async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        // The async mutex is held only while a connection is being made (rare); the manager
        // itself is a cheap clone shared by all requests.
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
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
                *guard = Some(conn.clone());
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
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        Ok(tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))??)
    }
}
