//! Per-key request limits: requests per second or minute with a burst (GCRA, exact: it never
//! admits more than configured), and concurrent requests in flight. In process here; shared
//! across nodes through Redis in [`shared`].
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT) of the next request; a
//! request is admitted when the TAT is no further ahead of `now` than the burst allows, and then
//! pushes the TAT one emission interval on. That is exactly a token bucket of `burst` tokens
//! refilled at `rate`, with no timer and no window edges to game.
//!
//! State lives in a sharded map keyed by the bucket name (the key id), outside any config
//! snapshot, so it survives reloads. A shard's std `Mutex` is held for one map lookup, never
//! across an `.await`; the counters themselves are atomics. Every call takes `now`, so tests
//! drive the clock.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod shared;

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `limits:` of a key, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Requests that may arrive at once before the steady rate applies; defaults to the
    /// per-period count (a full second's or minute's worth).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Requests of this key in flight at the same time.
    #[serde(default)]
    pub concurrent_requests: Option<u32>,
    /// Prompt + completion tokens per minute (reserved from an estimate, settled with usage).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Prompt + completion tokens per day (UTC-independent 24 h windows).
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
}

/// A token budget: `limit` tokens per fixed `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimit {
    pub limit: u64,
    pub window: Duration,
}

/// A bare request rate (`limits:` on a route, `limits.per_ip`): no tokens, no concurrency.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateConfig {
    /// The validated rate; an error when none or both periods are set.
    pub fn to_limit(&self) -> Result<RequestLimit, String> {
        let limits = KeyLimits::from_config(&LimitsConfig {
            requests_per_second: self.requests_per_second,
            requests_per_minute: self.requests_per_minute,
            burst: self.burst,
            ..LimitsConfig::default()
        })?;
        limits
            .requests
            .ok_or_else(|| "set requests_per_second or requests_per_minute".to_string())
    }
}

/// A request rate: `count` per `period`, with `burst` allowed at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimit {
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

/// A key's validated limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests: Option<RequestLimit>,
    pub concurrency: Option<u32>,
    /// Token budgets, shortest window first.
    pub tokens: Vec<TokenLimit>,
}

impl KeyLimits {
    /// Validates a `limits:` section; the error says what is wrong (the caller adds the path).
    pub fn from_config(c: &LimitsConfig) -> Result<KeyLimits, String> {
        let requests = match (c.requests_per_second, c.requests_per_minute) {
            (Some(_), Some(_)) => {
                return Err("set requests_per_second or requests_per_minute, not both".into())
            }
            (Some(n), None) => Some((n, Duration::from_secs(1))),
            (None, Some(n)) => Some((n, Duration::from_secs(60))),
            (None, None) => None,
        };
        let requests = match requests {
            Some((0, _)) => return Err("a request rate must be at least 1".into()),
            Some((count, period)) => Some(RequestLimit {
                count,
                period,
                burst: match c.burst {
                    Some(0) => return Err("burst must be at least 1".into()),
                    Some(b) => b,
                    None => count,
                },
            }),
            None if c.burst.is_some() => {
                return Err("burst needs requests_per_second or requests_per_minute".into())
            }
            None => None,
        };
        if c.concurrent_requests == Some(0) {
            return Err("concurrent_requests must be at least 1".into());
        }
        let mut tokens = Vec::new();
        for (limit, window) in [
            (c.tokens_per_minute, Duration::from_secs(60)),
            (c.tokens_per_day, Duration::from_secs(86_400)),
        ] {
            match limit {
                Some(0) => return Err("a token limit must be at least 1".into()),
                Some(limit) => tokens.push(TokenLimit { limit, window }),
                None => {}
            }
        }
        Ok(KeyLimits {
            requests,
            concurrency: c.concurrent_requests,
            tokens,
        })
    }
}

/// An admitted request's view of its limit, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStatus {
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset_after: Duration,
}

/// A refusal: when to try again, and the status for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
    pub status: RateStatus,
    pub reason: LimitReason,
}

impl Limited {
    /// A refusal with nothing better to say than "try again in a second" (a concurrency cap,
    /// an unreachable store): `limit` for the headers, nothing remaining.
    pub fn for_a_second(limit: u32, reason: LimitReason) -> Limited {
        let second = Duration::from_secs(1);
        Limited {
            retry_after: second,
            status: RateStatus {
                limit,
                remaining: 0,
                reset_after: second,
            },
            reason,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReason {
    Requests,
    Tokens,
    Concurrency,
    /// The shared store could not be asked and `on_redis_error: fail_closed` is set.
    Unavailable,
}

impl LimitReason {
    pub fn label(self) -> &'static str {
        match self {
            LimitReason::Requests => "requests",
            LimitReason::Tokens => "tokens",
            LimitReason::Concurrency => "concurrency",
            LimitReason::Unavailable => "store_unavailable",
        }
    }
}

#[derive(Default)]
struct Bucket {
    /// Theoretical arrival time, in nanoseconds since the limiter's epoch.
    tat: AtomicU64,
    in_flight: AtomicU32,
    /// Token windows; a std Mutex held for a few integer updates, per key (not global).
    tokens: Mutex<Vec<Window>>,
}

/// One fixed token window of a key.
struct Window {
    length_ms: u64,
    /// Which window (`now / length`) `used` counts for.
    index: u64,
    used: u64,
}

/// Tokens reserved for one request; [`TokenReservation::settle`] replaces the estimate with
/// what the request really used. Dropped unsettled (the request's task panicked or was
/// dropped before it could settle: the client got no answer), the reservation is refunded.
pub struct TokenReservation {
    bucket: Arc<Bucket>,
    /// (window length, window index) of each window charged.
    charged: Vec<(u64, u64)>,
    pub reserved: u64,
    settled: bool,
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        if !self.settled {
            self.apply(0);
        }
    }
}

impl TokenReservation {
    /// Corrects every still-current window by `actual - reserved` (a refund when the request
    /// used fewer tokens than estimated). A window that rolled over meanwhile is left alone.
    pub fn settle(mut self, actual: u64) {
        self.apply(actual);
        self.settled = true;
    }

    fn apply(&self, actual: u64) {
        let mut windows = match self.bucket.tokens.lock() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        for (length_ms, index) in &self.charged {
            if let Some(w) = windows
                .iter_mut()
                .find(|w| w.length_ms == *length_ms && w.index == *index)
            {
                w.used = w.used.saturating_add(actual).saturating_sub(self.reserved);
            }
        }
    }
}

const SHARDS: usize = 64;

/// All in-process buckets.
pub struct LocalLimiter {
    epoch: Instant,
    shards: Vec<Mutex<HashMap<String, Arc<Bucket>>>>,
    /// Checks so far; every `SWEEP_EVERY`th sweeps one shard of idle buckets.
    checks: AtomicU64,
}

/// How often (in checks) one shard is swept of idle buckets: keeps per-IP buckets bounded
/// without a timer task.
const SWEEP_EVERY: u64 = 1024;

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter::new()
    }
}

/// Holds one in-flight slot of a key; releases it when dropped.
pub struct InFlight {
    bucket: Arc<Bucket>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.bucket.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LocalLimiter {
    pub fn new() -> LocalLimiter {
        LocalLimiter {
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            checks: AtomicU64::new(0),
        }
    }

    /// Shard `n % SHARDS`, locked (a panic elsewhere while it was held leaves its map usable).
    fn shard(&self, n: usize) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Bucket>>> {
        // `n % SHARDS` is below SHARDS, the length `new` gives `shards`.
        #[allow(clippy::indexing_slicing)]
        let shard = &self.shards[n % SHARDS];
        match shard.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn bucket(&self, key: &str) -> Arc<Bucket> {
        let mut map = self.shard(fnv(key) as usize);
        if let Some(b) = map.get(key) {
            return b.clone();
        }
        let b = Arc::new(Bucket::default());
        map.insert(key.to_string(), b.clone());
        b
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Drops one shard's buckets that hold nothing: bucket full again, nothing in flight, no
    /// token window. Only this map holds them then, so no one can observe the removal.
    fn sweep(&self, now_ns: u64) {
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if !n.is_multiple_of(SWEEP_EVERY) {
            return;
        }
        let mut map = self.shard((n / SWEEP_EVERY) as usize);
        map.retain(|_, b| {
            let idle = b.tat.load(Ordering::Acquire) <= now_ns
                && b.in_flight.load(Ordering::Acquire) == 0
                && b.tokens.lock().is_ok_and(|w| w.is_empty())
                && Arc::strong_count(b) == 1;
            !idle
        });
    }

    /// Buckets currently held (for tests and metrics).
    pub fn buckets(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    /// Admits one request of `key` under `limit` at `now`, or says when to retry.
    pub fn check_request(
        &self,
        key: &str,
        limit: &RequestLimit,
        now: Instant,
    ) -> Result<RateStatus, Limited> {
        let bucket = self.bucket(key);
        let (interval, tolerance) = gcra_steps(limit, limit.period.as_nanos());
        let now_ns = self.nanos(now);
        self.sweep(now_ns);
        let mut tat = bucket.tat.load(Ordering::Acquire);
        loop {
            let start = tat.max(now_ns);
            // `start >= now_ns`: the subtractions below cannot go under zero.
            let ahead = start.saturating_sub(now_ns);
            if ahead > tolerance {
                let wait = ahead.saturating_sub(tolerance);
                return Err(Limited {
                    retry_after: Duration::from_nanos(wait),
                    status: RateStatus {
                        limit: limit.count,
                        remaining: 0,
                        reset_after: Duration::from_nanos(ahead),
                    },
                    reason: LimitReason::Requests,
                });
            }
            let next = start.saturating_add(interval.get());
            match bucket
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let ahead = next.saturating_sub(now_ns);
                    let remaining = tolerance
                        .saturating_add(interval.get())
                        .saturating_sub(ahead)
                        / interval;
                    return Ok(RateStatus {
                        limit: limit.count,
                        remaining: remaining.min(u64::from(u32::MAX)) as u32,
                        reset_after: Duration::from_nanos(ahead),
                    });
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Takes one of `max` in-flight slots of `key`; the slot is held until the guard drops.
    pub fn acquire(&self, key: &str, max: u32) -> Result<InFlight, Limited> {
        let bucket = self.bucket(key);
        let mut current = bucket.in_flight.load(Ordering::Acquire);
        loop {
            if current >= max {
                return Err(Limited::for_a_second(max, LimitReason::Concurrency));
            }
            match bucket.in_flight.compare_exchange_weak(
                current,
                // `current < max <= u32::MAX`: no overflow.
                current.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(InFlight { bucket }),
                Err(c) => current = c,
            }
        }
    }

    /// Reserves `estimate` tokens of `key` in every window of `limits`, or refuses when any
    /// window would go over. Returns the reservation and the tightest window's status.
    pub fn reserve_tokens(
        &self,
        key: &str,
        limits: &[TokenLimit],
        estimate: u64,
        now: Instant,
    ) -> Result<(TokenReservation, RateStatus), Limited> {
        let bucket = self.bucket(key);
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let mut charged = Vec::with_capacity(limits.len());
        let mut tightest: Option<RateStatus> = None;
        {
            let mut windows = match bucket.tokens.lock() {
                Ok(w) => w,
                Err(p) => p.into_inner(),
            };
            // Check every window before charging any: all or nothing.
            for limit in limits {
                let length_ms = window_ms(limit);
                let index = now_ms / length_ms;
                // The end of window `index`, which is after `now_ms`.
                let end_ms = index.saturating_add(1).saturating_mul(length_ms.get());
                let reset = Duration::from_millis(end_ms.saturating_sub(now_ms));
                let length_ms = length_ms.get();
                let used = windows
                    .iter()
                    .find(|w| w.length_ms == length_ms && w.index == index)
                    .map_or(0, |w| w.used);
                let status = RateStatus {
                    limit: limit.limit.min(u64::from(u32::MAX)) as u32,
                    remaining: limit
                        .limit
                        .saturating_sub(used.saturating_add(estimate))
                        .min(u64::from(u32::MAX)) as u32,
                    reset_after: reset,
                };
                if used.saturating_add(estimate) > limit.limit {
                    return Err(Limited {
                        retry_after: reset,
                        status: RateStatus {
                            remaining: limit.limit.saturating_sub(used).min(u64::from(u32::MAX))
                                as u32,
                            ..status
                        },
                        reason: LimitReason::Tokens,
                    });
                }
                if tightest.is_none_or(|t| status.remaining < t.remaining) {
                    tightest = Some(status);
                }
            }
            for limit in limits {
                let length_ms = window_ms(limit);
                let index = now_ms / length_ms;
                let length_ms = length_ms.get();
                match windows.iter_mut().find(|w| w.length_ms == length_ms) {
                    Some(w) if w.index == index => w.used = w.used.saturating_add(estimate),
                    Some(w) => {
                        w.index = index;
                        w.used = estimate;
                    }
                    None => windows.push(Window {
                        length_ms,
                        index,
                        used: estimate,
                    }),
                }
                charged.push((length_ms, index));
            }
        }
        let status = tightest.unwrap_or(RateStatus {
            limit: 0,
            remaining: 0,
            reset_after: Duration::ZERO,
        });
        Ok((
            TokenReservation {
                settled: false,
                bucket,
                charged,
                reserved: estimate,
            },
            status,
        ))
    }

    /// Requests of `key` in flight now.
    pub fn in_flight(&self, key: &str) -> u32 {
        self.bucket(key).in_flight.load(Ordering::Acquire)
    }
}

/// GCRA's emission interval (`period / count`, at least 1) and burst tolerance
/// (`interval * (burst - 1)`), in the unit `period` is given in. `count` and `burst` are at
/// least 1 once validated; the floors below only keep a hand-built limit from panicking.
pub(crate) fn gcra_steps(limit: &RequestLimit, period: u128) -> (NonZeroU64, u64) {
    let count = NonZeroU64::new(u64::from(limit.count)).unwrap_or(NonZeroU64::MIN);
    let interval = NonZeroU64::new(period as u64 / count).unwrap_or(NonZeroU64::MIN);
    let tolerance = interval
        .get()
        .saturating_mul(u64::from(limit.burst.saturating_sub(1)));
    (interval, tolerance)
}

/// A token window's length in milliseconds, at least 1.
pub(crate) fn window_ms(limit: &TokenLimit) -> NonZeroU64 {
    NonZeroU64::new(limit.window.as_millis().max(1) as u64).unwrap_or(NonZeroU64::MIN)
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s`. Written without
/// `format!`, whose machinery showed in the profile (about 500 instructions on every limited
/// request).
pub fn format_reset(d: Duration) -> String {
    let mut out = String::with_capacity(16);
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < 1000 {
        push_number(&mut out, ms);
        out.push_str("ms");
    } else if d < Duration::from_secs(60) {
        // Seconds to three places, rounded (as `{:.3}` would), without trailing zeros.
        let ms = u64::try_from(d.as_nanos().saturating_add(500_000) / 1_000_000).unwrap_or(0);
        push_number(&mut out, ms / 1000);
        let frac = ms % 1000;
        if frac != 0 {
            let (tenths, hundredths, thousandths) = (frac / 100, frac / 10 % 10, frac % 10);
            out.push('.');
            out.push(digit(tenths));
            if hundredths != 0 || thousandths != 0 {
                out.push(digit(hundredths));
            }
            if thousandths != 0 {
                out.push(digit(thousandths));
            }
        }
        out.push('s');
    } else {
        let whole = d.as_secs();
        push_number(&mut out, whole / 60);
        out.push('m');
        push_number(&mut out, whole % 60);
        out.push('s');
    }
    out
}

/// Appends `n` in decimal.
fn push_number(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// The decimal digit `d` (below 10).
fn digit(d: u64) -> char {
    char::from_digit(u32::try_from(d).unwrap_or(0), 10).unwrap_or('0')
}

/// FNV-1a of `s`: picks a shard (fast, and no attacker gains from a collision there but a
/// shared lock).
pub(crate) fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    fn per_minute(count: u32, burst: u32) -> RequestLimit {
        RequestLimit {
            count,
            period: Duration::from_secs(60),
            burst,
        }
    }

    #[test]
    fn burst_then_exactly_the_steady_rate() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let limit = per_minute(60, 10);
        // The burst goes through at once, counting down.
        for i in 0..10 {
            let s = limiter.check_request("k", &limit, t0).unwrap();
            assert_eq!(s.remaining, 9 - i);
        }
        let refused = limiter.check_request("k", &limit, t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(refused.reason, LimitReason::Requests);
        // Then one per second: over the next 30 s, exactly 30 more.
        let mut admitted = 0;
        for ms in (0..30_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms + 100);
            if limiter.check_request("k", &limit, now).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 30);
        // Keys do not share buckets.
        assert!(limiter.check_request("other", &limit, t0).is_ok());
    }

    #[test]
    fn a_quiet_key_refills_to_its_burst_and_no_more() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let limit = per_minute(60, 3);
        for _ in 0..3 {
            limiter.check_request("k", &limit, t0).unwrap();
        }
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.check_request("k", &limit, later).unwrap();
        }
        assert!(limiter.check_request("k", &limit, later).is_err());
    }

    #[test]
    fn concurrency_slots_are_released_by_the_guard() {
        let limiter = LocalLimiter::new();
        let a = limiter.acquire("k", 2).unwrap();
        let _b = limiter.acquire("k", 2).unwrap();
        assert_eq!(
            limiter.acquire("k", 2).err().map(|l| l.reason),
            Some(LimitReason::Concurrency)
        );
        drop(a);
        assert_eq!(limiter.in_flight("k"), 1);
        assert!(limiter.acquire("k", 2).is_ok());
    }

    #[test]
    fn token_reservations_are_refunded_on_settle() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let per_minute = [TokenLimit {
            limit: 200,
            window: Duration::from_secs(60),
        }];
        let (first, status) = limiter.reserve_tokens("k", &per_minute, 170, t0).unwrap();
        assert_eq!(status.remaining, 30);
        // Without the refund a second 170 would not fit.
        assert_eq!(
            limiter
                .reserve_tokens("k", &per_minute, 170, t0)
                .err()
                .map(|l| l.reason),
            Some(LimitReason::Tokens)
        );
        first.settle(11);
        let (second, status) = limiter.reserve_tokens("k", &per_minute, 170, t0).unwrap();
        assert_eq!(status.remaining, 19);
        second.settle(170);
        // A new window starts empty.
        assert!(limiter
            .reserve_tokens("k", &per_minute, 190, t0 + Duration::from_secs(61))
            .is_ok());
    }

    #[test]
    fn every_window_must_have_room() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let limits = [
            TokenLimit {
                limit: 100,
                window: Duration::from_secs(60),
            },
            TokenLimit {
                limit: 150,
                window: Duration::from_secs(86_400),
            },
        ];
        limiter
            .reserve_tokens("k", &limits, 90, t0)
            .unwrap()
            .0
            .settle(90);
        let next_minute = t0 + Duration::from_secs(61);
        let Err(refused) = limiter.reserve_tokens("k", &limits, 90, next_minute) else {
            panic!("the day window should refuse");
        };
        assert_eq!(refused.status.limit, 150, "the day window refuses");
        // Nothing was charged by the refused request.
        assert!(limiter
            .reserve_tokens("k", &limits, 60, next_minute)
            .is_ok());
    }

    #[test]
    fn a_huge_estimate_is_refused_and_cannot_wrap_a_window() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let limits = [TokenLimit {
            window: Duration::from_secs(60),
            limit: 1000,
        }];
        let (held, _) = limiter.reserve_tokens("k", &limits, 600, t0).unwrap();
        assert!(limiter.reserve_tokens("k", &limits, u64::MAX, t0).is_err());
        held.settle(u64::MAX);
        // Saturated at the top, never wrapped to zero: the key stays limited.
        assert!(limiter.reserve_tokens("k", &limits, 1, t0).is_err());
    }

    #[test]
    fn a_reservation_dropped_unsettled_is_refunded() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let limits = [TokenLimit {
            window: Duration::from_secs(60),
            limit: 1000,
        }];
        let (held, _) = limiter.reserve_tokens("k", &limits, 900, t0).unwrap();
        assert!(limiter.reserve_tokens("k", &limits, 200, t0).is_err());
        drop(held);
        let (kept, status) = limiter.reserve_tokens("k", &limits, 200, t0).unwrap();
        assert_eq!(status.remaining, 800);
        kept.settle(200);
        let (_, status) = limiter.reserve_tokens("k", &limits, 100, t0).unwrap();
        assert_eq!(status.remaining, 700, "a settled reservation stays charged");
    }

    #[test]
    fn idle_buckets_are_swept() {
        let limiter = LocalLimiter::new();
        let t0 = Instant::now();
        let limit = per_minute(60, 1);
        for i in 0..5000 {
            let _ = limiter.check_request(&format!("ip:{i}"), &limit, t0);
        }
        let later = t0 + Duration::from_secs(120);
        for _ in 0..(SWEEP_EVERY * SHARDS as u64) {
            let _ = limiter.check_request("busy", &limit, later);
        }
        assert!(
            limiter.buckets() < 100,
            "{} buckets left",
            limiter.buckets()
        );
    }

    #[test]
    fn config_is_validated() {
        let ok = KeyLimits::from_config(&LimitsConfig {
            requests_per_minute: Some(60),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            ok.requests.unwrap().burst,
            60,
            "burst defaults to a period's worth"
        );
        for bad in [
            LimitsConfig {
                requests_per_second: Some(1),
                requests_per_minute: Some(1),
                ..Default::default()
            },
            LimitsConfig {
                requests_per_minute: Some(0),
                ..Default::default()
            },
            LimitsConfig {
                burst: Some(5),
                ..Default::default()
            },
            LimitsConfig {
                requests_per_minute: Some(5),
                burst: Some(0),
                ..Default::default()
            },
            LimitsConfig {
                concurrent_requests: Some(0),
                ..Default::default()
            },
        ] {
            assert!(KeyLimits::from_config(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reset_durations_read_like_openais() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(2)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        // As `{:.3}` formats seconds, trailing zeros dropped, across the whole range.
        for ms in (0..200_000u64)
            .step_by(7)
            .chain([999, 1000, 59_999, 60_000])
        {
            // (Not at a half millisecond: f64 cannot hold most of those exactly.)
            for extra_us in [0u64, 499, 501, 999] {
                let d = Duration::from_millis(ms) + Duration::from_micros(extra_us);
                let expected = if d.as_millis() < 1000 {
                    format!("{}ms", d.as_millis())
                } else if d.as_secs_f64() < 60.0 {
                    let text = format!("{:.3}", d.as_secs_f64());
                    format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
                } else {
                    format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
                };
                assert_eq!(format_reset(d), expected, "{d:?}");
            }
        }
    }
}
