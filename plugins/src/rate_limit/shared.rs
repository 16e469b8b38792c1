//! Request limits shared by every node that points at the same Redis.
//!
//! One round trip per request: an atomic Lua script (loaded once, then called by its SHA) runs
//! GCRA on Redis's own clock, so nodes with skewed clocks still agree. Keys are
//! `{prefix:bucket}:rl` — the braces are a Redis Cluster hash tag, so a bucket's keys live on
//! one slot — and expire once the bucket would be full again, so idle keys vanish.
//!
//! Errors and timeouts are returned to the caller, which applies `on_redis_error`: Redis being
//! down must not take the edge down. The connection is the node's shared [`RedisLink`].

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::Duration;

use crate::redis_link::RedisLink;

use super::{gcra_steps, window_ms, LimitReason, Limited, RateStatus, RequestLimit};

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

/// Token windows on Redis time. KEYS[i]: one hash per window length (`i`: window index, `u`:
/// used); ARGV: estimate, then (length ms, limit) per window. All or nothing.
/// Returns {1, index, used, ms to reset, …per window} or {0, window, used, ms to reset}.
const RESERVE_TOKENS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local est = tonumber(ARGV[1])
local used, idx = {}, {}
for i = 1, #KEYS do
  local len, lim = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  idx[i] = math.floor(now / len)
  local cur = redis.call('HMGET', KEYS[i], 'i', 'u')
  local u = 0
  if tonumber(cur[1]) == idx[i] then u = tonumber(cur[2]) or 0 end
  used[i] = u
  if u + est > lim then return {0, i, u, (idx[i] + 1) * len - now} end
end
local out = {1}
for i = 1, #KEYS do
  local len = tonumber(ARGV[2 * i])
  redis.call('HSET', KEYS[i], 'i', idx[i], 'u', used[i] + est)
  redis.call('PEXPIRE', KEYS[i], len * 2)
  table.insert(out, idx[i])
  table.insert(out, used[i] + est)
  table.insert(out, (idx[i] + 1) * len - now)
end
return out
";

/// Settles a reservation: KEYS as above; ARGV: delta (actual − reserved), then the window index
/// charged per window. A window that rolled over is left alone; usage never goes below zero.
const SETTLE_TOKENS: &str = r"
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  if tonumber(redis.call('HGET', KEYS[i], 'i')) == tonumber(ARGV[i + 1]) then
    local u = tonumber(redis.call('HGET', KEYS[i], 'u')) or 0
    local v = u + delta
    if v < 0 then v = 0 end
    redis.call('HSET', KEYS[i], 'u', v)
  end
end
return 1
";

/// A key's request rate and concurrency in one atomic call (one round trip per request).
/// KEYS: the GCRA key, the in-flight set (same hash tag). ARGV: interval µs (0: no rate),
/// tolerance µs, max in flight (0: no cap), member, stale-after ms. The slot is checked
/// first, so a refusal for concurrency does not spend a rate token.
/// Returns {1, µs until full, 0} admitted, {0, µs until full, µs to wait} rate-limited,
/// {2, 0, 0} concurrency-limited.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local interval, tolerance, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - tonumber(ARGV[5]))
  if redis.call('ZCARD', KEYS[2]) >= max then return {2, 0, 0} end
end
local ahead = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  if tat - now > tolerance then return {0, tat - now, tat - now - tolerance} end
  local nxt = tat + interval
  redis.call('SET', KEYS[1], nxt, 'PX', math.ceil((nxt - now) / 1000) + 1000)
  ahead = nxt - now
end
if max > 0 then
  redis.call('ZADD', KEYS[2], now_ms, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return {1, ahead, 0}
";

/// What [`SharedLimiter::admit`] decided.
#[derive(Debug)]
pub struct Admitted {
    /// The rate's status, when the key has a rate.
    pub rate: Option<RateStatus>,
    /// The in-flight slot, when the key has a concurrency cap.
    pub slot: Option<SharedSlot>,
}

/// How long an in-flight entry counts at most: a node that dies mid-request cannot hold a
/// fleet-wide slot for longer than this.
pub const IN_FLIGHT_STALE_AFTER: Duration = Duration::from_secs(600);

/// A fleet-wide in-flight slot; give it back with [`SharedLimiter::release`].
#[derive(Debug, Clone)]
pub struct SharedSlot {
    key: String,
    member: String,
}

/// A fleet-wide slot held for one request: given back when dropped, however the request
/// ended (answered, refused later, its client gone, its task panicked). The release runs off
/// the request's path, on the current runtime; a release that cannot run expires after
/// [`IN_FLIGHT_STALE_AFTER`].
pub struct SlotGuard {
    limiter: Arc<SharedLimiter>,
    slot: Option<SharedSlot>,
}

impl SlotGuard {
    pub fn new(limiter: Arc<SharedLimiter>, slot: SharedSlot) -> SlotGuard {
        SlotGuard {
            limiter,
            slot: Some(slot),
        }
    }
}

impl SlotGuard {
    /// Gives the slot back now (the request ended normally), waiting for Redis's answer.
    pub async fn release(mut self) {
        if let Some(slot) = self.slot.take() {
            let _ = self.limiter.release(&slot).await;
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let limiter = self.limiter.clone();
            runtime.spawn(async move {
                let _ = limiter.release(&slot).await;
            });
        }
    }
}

/// A reservation held for one request: settled by the pipeline with what was used, or, when
/// dropped unsettled (a panic, a dropped future: no answer reached the client), refunded off
/// the request's path.
pub struct ReservationGuard {
    limiter: Arc<SharedLimiter>,
    reservation: Option<SharedReservation>,
}

impl ReservationGuard {
    pub fn new(limiter: Arc<SharedLimiter>, reservation: SharedReservation) -> ReservationGuard {
        ReservationGuard {
            limiter,
            reservation: Some(reservation),
        }
    }

    /// Tokens reserved (0 once taken).
    pub fn reserved(&self) -> u64 {
        self.reservation.as_ref().map_or(0, |r| r.reserved)
    }

    /// The reservation, to settle it; the guard then has nothing left to refund.
    pub fn take(&mut self) -> Option<SharedReservation> {
        self.reservation.take()
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let limiter = self.limiter.clone();
            runtime.spawn(async move {
                let _ = limiter.settle_tokens(&reservation, 0).await;
            });
        }
    }
}

/// Tokens reserved in Redis for one request; settle it with [`SharedLimiter::settle_tokens`].
#[derive(Debug, Clone)]
pub struct SharedReservation {
    bucket: String,
    /// (window length ms, window index) per window charged.
    windows: Vec<(u64, u64)>,
    pub reserved: u64,
}

pub use crate::redis_link::SharedError;

/// The shared limiter: the scripts, run over the node's shared Redis link.
pub struct SharedLimiter {
    link: Arc<RedisLink>,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
    reserve_script: redis::Script,
    admit_script: redis::Script,
    settle_script: redis::Script,
}

impl SharedLimiter {
    /// Limits kept under `prefix` over `link`; nothing is connected until the first check.
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> SharedLimiter {
        SharedLimiter {
            timeout: link.timeout,
            link,
            prefix: prefix.to_string(),
            script: redis::Script::new(GCRA),
            reserve_script: redis::Script::new(RESERVE_TOKENS),
            admit_script: redis::Script::new(ADMIT),
            settle_script: redis::Script::new(SETTLE_TOKENS),
        }
    }

    /// The Redis link this limiter uses (shared with the cache).
    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    async fn connection(&self) -> Result<crate::redis_link::RedisConn, SharedError> {
        self.link.connection("rate_limit").await
    }

    /// The slot `member` would hold in `bucket`: for giving back a slot whose admit timed out
    /// (the script may have run and added it).
    pub fn slot(&self, bucket: &str, member: &str) -> SharedSlot {
        SharedSlot {
            key: format!("{{{}:{}}}:inflight", self.prefix, bucket),
            member: member.to_string(),
        }
    }

    /// Checks `bucket`'s rate and takes one of its in-flight slots in one round trip.
    pub async fn admit(
        &self,
        bucket: &str,
        rate: Option<&RequestLimit>,
        max_in_flight: Option<u32>,
        member: &str,
    ) -> Result<Result<Admitted, Limited>, SharedError> {
        let (interval, tolerance) = match rate {
            Some(l) => {
                let (interval, tolerance) = gcra_steps(l, l.period.as_micros());
                (interval.get(), tolerance)
            }
            None => (0, 0),
        };
        let max = max_in_flight.unwrap_or(0);
        let set = format!("{{{}:{}}}:inflight", self.prefix, bucket);
        let mut invocation = self
            .admit_script
            .key(format!("{{{}:{}}}:rl", self.prefix, bucket));
        invocation
            .key(&set)
            .arg(interval)
            .arg(tolerance)
            .arg(max)
            .arg(member)
            .arg(IN_FLIGHT_STALE_AFTER.as_millis() as u64);
        let invocation = &invocation;
        let (code, ahead, wait): (i64, i64, i64) = self
            .link
            .retrying("rate_limit", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let ahead = ahead.max(0) as u64;
        let status = |remaining| {
            rate.map(|l| RateStatus {
                limit: l.count,
                remaining,
                reset_after: Duration::from_micros(ahead),
            })
        };
        match code {
            1 => {
                let remaining = tolerance
                    .saturating_add(interval)
                    .saturating_sub(ahead)
                    .checked_div(interval)
                    .unwrap_or(0)
                    .min(u64::from(u32::MAX)) as u32;
                Ok(Ok(Admitted {
                    rate: status(remaining),
                    slot: (max > 0).then(|| SharedSlot {
                        key: set,
                        member: member.to_string(),
                    }),
                }))
            }
            0 => Ok(Err(Limited {
                retry_after: Duration::from_micros(wait.max(0) as u64),
                status: status(0).unwrap_or(RateStatus {
                    limit: 0,
                    remaining: 0,
                    reset_after: Duration::ZERO,
                }),
                reason: LimitReason::Requests,
            })),
            _ => Ok(Err(Limited::for_a_second(max, LimitReason::Concurrency))),
        }
    }

    /// Gives a slot back.
    pub async fn release(&self, slot: &SharedSlot) -> Result<(), SharedError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&slot.key).arg(&slot.member);
        // ZREM of one member is idempotent: a second try is always safe.
        let cmd = &cmd;
        self.link
            .retrying("rate_limit", |mut conn| async move {
                cmd.query_async::<i64>(&mut conn).await
            })
            .await?;
        Ok(())
    }

    fn window_key(&self, bucket: &str, length_ms: u64) -> String {
        format!("{{{}:{}}}:tok:{}", self.prefix, bucket, length_ms)
    }

    /// Reserves `estimate` tokens of `bucket` in every window of `limits`, across every node.
    pub async fn reserve_tokens(
        &self,
        bucket: &str,
        limits: &[super::TokenLimit],
        estimate: u64,
    ) -> Result<Result<(SharedReservation, RateStatus), Limited>, SharedError> {
        let mut invocation = self.reserve_script.prepare_invoke();
        invocation.arg(estimate);
        for l in limits {
            let length_ms = window_ms(l).get();
            invocation.key(self.window_key(bucket, length_ms));
            invocation.arg(length_ms).arg(l.limit);
        }
        let invocation = &invocation;
        let reply: Vec<i64> = self
            .link
            .retrying("rate_limit", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let to_u32 = |v: u64| v.min(u64::from(u32::MAX)) as u32;
        if reply.first() == Some(&0) {
            // The script's window number counts from 1.
            let window = (reply.get(1).copied().unwrap_or(1).max(1) as usize).saturating_sub(1);
            let used = reply.get(2).copied().unwrap_or(0).max(0) as u64;
            let reset = Duration::from_millis(reply.get(3).copied().unwrap_or(0).max(0) as u64);
            let limit = limits.get(window).map_or(0, |l| l.limit);
            return Ok(Err(Limited {
                retry_after: reset,
                status: RateStatus {
                    limit: to_u32(limit),
                    remaining: to_u32(limit.saturating_sub(used)),
                    reset_after: reset,
                },
                reason: LimitReason::Tokens,
            }));
        }
        let mut windows = Vec::with_capacity(limits.len());
        let mut tightest: Option<RateStatus> = None;
        // `[1, index, used, reset, index, used, reset, …]`; a short reply leaves windows out.
        let triples = reply.get(1..).unwrap_or_default().chunks_exact(3);
        for (l, chunk) in limits.iter().zip(triples) {
            let &[index, used, reset] = chunk else {
                continue;
            };
            let [index, used, reset] = [index, used, reset].map(|v| v.max(0) as u64);
            windows.push((window_ms(l).get(), index));
            let status = RateStatus {
                limit: to_u32(l.limit),
                remaining: to_u32(l.limit.saturating_sub(used)),
                reset_after: Duration::from_millis(reset),
            };
            if tightest.is_none_or(|t| status.remaining < t.remaining) {
                tightest = Some(status);
            }
        }
        let status = tightest.unwrap_or(RateStatus {
            limit: 0,
            remaining: 0,
            reset_after: Duration::ZERO,
        });
        Ok(Ok((
            SharedReservation {
                bucket: bucket.to_string(),
                windows,
                reserved: estimate,
            },
            status,
        )))
    }

    /// Replaces a reservation's estimate with what the request used.
    pub async fn settle_tokens(
        &self,
        reservation: &SharedReservation,
        actual: u64,
    ) -> Result<(), SharedError> {
        // Not retried on a dead connection: a settle that had run before the connection broke
        // would count the difference twice, and this one errs towards admitting more.
        let mut conn = self.connection().await?;
        // Both are bounded (`max_tokens` is capped at parse), but never trust a cast to.
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let delta = signed(actual).saturating_sub(signed(reservation.reserved));
        let mut invocation = self.settle_script.prepare_invoke();
        invocation.arg(delta);
        for (length_ms, index) in &reservation.windows {
            invocation.key(self.window_key(&reservation.bucket, *length_ms));
            invocation.arg(*index);
        }
        let _: i64 = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| SharedError::Timeout(self.timeout))??;
        Ok(())
    }

    /// Admits one request of `bucket` under `limit`, counted across every node.
    pub async fn check_request(
        &self,
        bucket: &str,
        limit: &RequestLimit,
    ) -> Result<Result<RateStatus, Limited>, SharedError> {
        let (interval, tolerance) = gcra_steps(limit, limit.period.as_micros());
        let key = format!("{{{}:{}}}:rl", self.prefix, bucket);
        let mut invocation = self.script.key(key);
        invocation.arg(interval.get()).arg(tolerance);
        let invocation = &invocation;
        let (admitted, ahead, wait): (i64, i64, i64) = self
            .link
            .retrying("rate_limit", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let ahead = ahead.max(0) as u64;
        if admitted == 1 {
            let remaining = tolerance
                .saturating_add(interval.get())
                .saturating_sub(ahead)
                / interval;
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
