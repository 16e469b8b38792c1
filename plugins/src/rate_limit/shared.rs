//! Request limits shared by every node that points at the same Redis.
//!
//! One round trip per request: an atomic Lua script (loaded once, then called by its SHA) runs
//! GCRA on Redis's own clock, so nodes with skewed clocks still agree. Keys are
//! `{prefix:bucket}:rl` — the braces are a Redis Cluster hash tag, so a bucket's keys live on
//! one slot — and expire once the bucket would be full again, so idle keys vanish.
//!
//! Errors and timeouts are returned to the caller, which applies `on_redis_error`: Redis being
//! down must not take the edge down. The connection is made lazily and re-made in the
//! background by redis-rs's `ConnectionManager`; while none can be made, calls fail fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex as AsyncMutex;

use super::{LimitReason, Limited, RateStatus, RequestLimit};

/// What to do when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Fall back to this node's own limiter (the default: the edge keeps serving).
    #[default]
    FailOpen,
    /// Refuse the request (429) while limits cannot be checked.
    FailClosed,
}

/// GCRA on Redis time. KEYS[1]: the bucket; ARGV: interval µs, tolerance µs.
/// Returns {admitted (1/0), µs until the bucket is full, µs to wait when refused}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - now, tat - now - tolerance}
end
local nxt = tat + interval
redis.call('SET', KEYS[1], nxt, 'PX', math.ceil((nxt - now) / 1000) + 1000)
return {1, nxt - now, 0}
";

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

/// The shared limiter: a lazily made connection and the script.
pub struct SharedLimiter {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
    conn: AsyncMutex<Option<ConnectionManager>>,
    /// Monotonic ms (since `epoch`) before which no new connection is attempted.
    retry_at_ms: AtomicU64,
    epoch: Instant,
}

impl SharedLimiter {
    /// `url` like `redis://127.0.0.1:6379`; nothing is connected until the first check.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<SharedLimiter, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid redis url: {e}"))?;
        Ok(SharedLimiter {
            client,
            prefix: prefix.to_string(),
            timeout,
            script: redis::Script::new(GCRA),
            conn: AsyncMutex::new(None),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, SharedError> {
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
                self.retry_at_ms.store(now_ms + 1000, Ordering::Release);
                Err(e.into())
            }
            Err(_) => {
                self.retry_at_ms.store(now_ms + 1000, Ordering::Release);
                Err(SharedError::Timeout(self.timeout))
            }
        }
    }

    /// Admits one request of `bucket` under `limit`, counted across every node.
    pub async fn check_request(
        &self,
        bucket: &str,
        limit: &RequestLimit,
    ) -> Result<Result<RateStatus, Limited>, SharedError> {
        let mut conn = self.connection().await?;
        let interval = (limit.period.as_micros() as u64 / u64::from(limit.count)).max(1);
        let tolerance = interval * u64::from(limit.burst - 1);
        let key = format!("{{{}:{}}}:rl", self.prefix, bucket);
        let mut invocation = self.script.key(key);
        invocation.arg(interval).arg(tolerance);
        let call = invocation.invoke_async(&mut conn);
        let (admitted, ahead, wait): (i64, i64, i64) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))??;
        let ahead = ahead.max(0) as u64;
        if admitted == 1 {
            let remaining = (tolerance + interval).saturating_sub(ahead) / interval;
            return Ok(Ok(RateStatus {
                limit: limit.count,
                remaining: remaining.min(u64::from(u32::MAX)) as u32,
                reset_after: Duration::from_micros(ahead),
            }));
        }
        Ok(Err(Limited {
            retry_after: Duration::from_micros(wait.max(0) as u64),
            status: RateStatus {
                limit: limit.count,
                remaining: 0,
                reset_after: Duration::from_micros(ahead),
            },
            reason: LimitReason::Requests,
        }))
    }
}
