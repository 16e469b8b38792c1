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

use crate::redis_link::owed::{owe, Charge, Creditor, Owed};
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

/// Token windows on Redis time. KEYS[1]: the reservation's settled marker, KEYS[2]: its
/// record (`estimate,index,index…`: what it holds, and in which window of each length), then
/// one hash per window length (`i`: window index, `u`: used); ARGV: estimate, ms the record
/// lives (0: no record, for counts never settled), then (length ms, limit) per window. All or
/// nothing. A reservation that arrives after it was settled (cancelled) reserves nothing; one
/// sent again after its reply was lost finds its record and reserves nothing more.
/// Returns {1, index, used, ms to reset, …per window}, {0, window, used, ms to reset} or {2}.
const RESERVE_TOKENS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local keep = tonumber(ARGV[2]) > 0
local again = keep and redis.call('EXISTS', KEYS[2]) == 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local est = tonumber(ARGV[1])
if again then est = 0 end
local used, idx = {}, {}
for i = 1, #KEYS - 2 do
  local len, lim = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  idx[i] = math.floor(now / len)
  local cur = redis.call('HMGET', KEYS[i + 2], 'i', 'u')
  local u = 0
  if tonumber(cur[1]) == idx[i] then u = tonumber(cur[2]) or 0 end
  used[i] = u
  if not again and u + est > lim then return {0, i, u, (idx[i] + 1) * len - now} end
end
local out = {1}
local rec = ARGV[1]
for i = 1, #KEYS - 2 do
  local len = tonumber(ARGV[2 * i + 1])
  if not again then
    redis.call('HSET', KEYS[i + 2], 'i', idx[i], 'u', used[i] + est)
    redis.call('PEXPIRE', KEYS[i + 2], len * 2)
  end
  rec = rec .. ',' .. idx[i]
  table.insert(out, idx[i])
  table.insert(out, used[i] + est)
  table.insert(out, (idx[i] + 1) * len - now)
end
if keep and not again then redis.call('SET', KEYS[2], rec, 'PX', tonumber(ARGV[2])) end
return out
";

/// Settles a reservation, once however often it is sent. KEYS as above; ARGV: tokens used, ms
/// a settled marker lives, then (length ms, window index charged, -1 when unknown) per window.
///
/// When the reservation's reply came (marker ms 0), its record is the proof it is unsettled:
/// no record, nothing to do. When the reply was lost (marker ms > 0: it may not have been
/// made), a marker makes the settle apply once and turns away the reservation if it arrives
/// later. With a record, what it held is replaced by what was used, in the windows it was
/// made in (a window that rolled over since is left alone); without one (never made), what
/// was used is counted in the current windows. Usage never goes below zero. Returns 1, or 0
/// when settled before.
const SETTLE_TOKENS: &str = r"
local marker_ms = tonumber(ARGV[2])
if marker_ms > 0 then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', marker_ms) then return 0 end
elseif redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
local rec = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[2])
local held, made = 0, {}
if rec then
  local j = 0
  for part in string.gmatch(rec, '[^,]+') do
    if j == 0 then held = tonumber(part) or 0 else made[j] = tonumber(part) end
    j = j + 1
  end
end
local actual = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS - 2 do
  local key, len = KEYS[i + 2], tonumber(ARGV[2 * i + 1])
  local stored = tonumber(redis.call('HGET', key, 'i'))
  local current = math.floor(now / len)
  if rec then
    local want = made[i] or tonumber(ARGV[2 * i + 2])
    if stored == want then
      local v = (tonumber(redis.call('HGET', key, 'u')) or 0) + actual - held
      if v < 0 then v = 0 end
      redis.call('HSET', key, 'u', v)
    end
  elseif actual > 0 then
    if stored == current then
      redis.call('HSET', key, 'u', (tonumber(redis.call('HGET', key, 'u')) or 0) + actual)
    elseif stored == nil or stored < current then
      redis.call('HSET', key, 'i', current, 'u', actual)
      redis.call('PEXPIRE', key, len * 2)
    end
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
    /// Whether the reservation may have been made (false: Redis surely never saw it).
    made: bool,
}

impl ReservationGuard {
    pub fn new(limiter: Arc<SharedLimiter>, reservation: SharedReservation) -> ReservationGuard {
        ReservationGuard {
            limiter,
            reservation: Some(reservation),
            made: true,
        }
    }

    /// A reservation Redis did not answer, for a request served on the node's own count.
    pub fn unanswered(
        limiter: Arc<SharedLimiter>,
        unanswered: Unanswered<SharedReservation>,
    ) -> ReservationGuard {
        ReservationGuard {
            limiter,
            reservation: Some(unanswered.pending),
            made: unanswered.error.may_have_run(),
        }
    }

    /// Charges `actual` tokens to the windows of an [`ReservationGuard::unanswered`]
    /// reservation once Redis answers: added to what this node owes the bucket (one write per
    /// bucket, however many requests), and the reservation, if it may have been made, given
    /// back by its id.
    pub fn owe(mut self, actual: u64) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let lengths = reservation.windows.iter().map(|(len, _)| *len).collect();
        owe(&self.limiter, (reservation.bucket.clone(), lengths), actual);
        if self.made {
            // What it may hold is given back by its own id (a refund, which may be dropped
            // in a long outage: the window then keeps the estimate until it rolls over).
            self.limiter.settle_tokens_later(reservation, 0);
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
        let Some(reservation) = self.reservation.take().filter(|_| self.made) else {
            return;
        };
        self.limiter.settle_tokens_later(reservation, 0);
    }
}

/// Tokens reserved in Redis for one request; settle it with [`SharedLimiter::settle_tokens`].
#[derive(Debug, Clone)]
pub struct SharedReservation {
    /// Gateway-made: names the reservation's record and settled marker.
    id: String,
    bucket: String,
    /// (window length ms, window index; -1 when unknown: the reply was lost) per window.
    windows: Vec<(u64, i64)>,
    pub reserved: u64,
}

pub use crate::redis_link::{SharedError, Unanswered};

/// How long a token reservation's record lives at least (longer for long windows): past any
/// request, so its settle finds what it held. A settle deletes it; only the reservations of
/// a node that died stay until then.
const RECORD_AT_LEAST_MS: u64 = 60 * 60 * 1000;

/// How long a settled marker lives (written only when a reservation's reply was lost): past
/// every resend of its settle, and past the reservation, were it still on its way.
const MARKER_MS: u64 = 20 * 60 * 1000;

/// The shared limiter: the scripts, run over the node's shared Redis link.
pub struct SharedLimiter {
    link: Arc<RedisLink>,
    prefix: String,
    script: redis::Script,
    reserve_script: redis::Script,
    admit_script: redis::Script,
    settle_script: redis::Script,
    /// What requests served while Redis could not be asked owe the token windows.
    owed: Owed<SharedLimiter>,
}

impl Creditor for SharedLimiter {
    /// A bucket and the lengths (ms) of its windows.
    type Target = (String, Vec<u64>);
    const OP: &'static str = "rate_limit";

    fn owed(&self) -> &Owed<SharedLimiter> {
        &self.owed
    }

    fn charge(self: Arc<Self>, (bucket, lengths): Self::Target, id: String, n: u64) -> Charge {
        Box::pin(async move {
            // A settle of a reservation never made (its reply "lost"): `n` tokens in each
            // window's current one, once.
            let none = SharedReservation {
                id,
                bucket,
                windows: lengths.into_iter().map(|len| (len, -1)).collect(),
                reserved: 0,
            };
            self.settle_tokens(&none, n).await
        })
    }
}

impl SharedLimiter {
    /// Limits kept under `prefix` over `link`; nothing is connected until the first check.
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> SharedLimiter {
        SharedLimiter {
            link,
            prefix: prefix.to_string(),
            script: redis::Script::new(GCRA),
            reserve_script: redis::Script::new(RESERVE_TOKENS),
            admit_script: redis::Script::new(ADMIT),
            settle_script: redis::Script::new(SETTLE_TOKENS),
            owed: Owed::default(),
        }
    }

    /// The Redis link this limiter uses (shared with the cache).
    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
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

    /// A reservation's settled marker and record (in its bucket's slot).
    fn reservation_keys(&self, bucket: &str, id: &str) -> [String; 2] {
        [
            format!("{{{}:{}}}:tok:settled:{}", self.prefix, bucket, id),
            format!("{{{}:{}}}:tok:held:{}", self.prefix, bucket, id),
        ]
    }

    /// Reserves `estimate` tokens of `bucket` in every window of `limits`, across every node.
    /// When Redis does not answer, the reservation (which may have been made) comes back as
    /// `pending`: the caller cancels it, or settles it with what the request used once Redis
    /// answers ([`SharedLimiter::settle_tokens_later`]), so the windows still add up.
    pub async fn reserve_tokens(
        &self,
        bucket: &str,
        limits: &[super::TokenLimit],
        estimate: u64,
    ) -> Result<Result<(SharedReservation, RateStatus), Limited>, Unanswered<SharedReservation>>
    {
        self.reserve_in(bucket, limits, estimate, true).await
    }

    /// Counts `n` against `bucket`'s windows for good, as [`SharedLimiter::reserve_tokens`]
    /// without a record: for counts never settled (a provider's requests).
    pub async fn count_tokens(
        &self,
        bucket: &str,
        limits: &[super::TokenLimit],
        n: u64,
    ) -> Result<Result<RateStatus, Limited>, SharedError> {
        match self.reserve_in(bucket, limits, n, false).await {
            Ok(counted) => Ok(counted.map(|(_, status)| status)),
            Err(unanswered) => Err(unanswered.error),
        }
    }

    async fn reserve_in(
        &self,
        bucket: &str,
        limits: &[super::TokenLimit],
        estimate: u64,
        record: bool,
    ) -> Result<Result<(SharedReservation, RateStatus), Limited>, Unanswered<SharedReservation>>
    {
        let mut pending = SharedReservation {
            id: String::new(),
            bucket: bucket.to_string(),
            windows: limits.iter().map(|l| (window_ms(l).get(), -1)).collect(),
            reserved: estimate,
        };
        pending.id = match crate::redis_link::write_id() {
            Ok(id) => id,
            Err(error) => return Err(Unanswered { error, pending }),
        };
        let mut invocation = self.reserve_script.prepare_invoke();
        for key in self.reservation_keys(bucket, &pending.id) {
            invocation.key(key);
        }
        // The record outlives the longest window and any request (a settle finds it).
        let longest = limits.iter().map(|l| window_ms(l).get()).max().unwrap_or(0);
        let record_ms = match record {
            true => longest.saturating_mul(2).max(RECORD_AT_LEAST_MS),
            false => 0,
        };
        invocation.arg(estimate).arg(record_ms);
        for l in limits {
            let length_ms = window_ms(l).get();
            invocation.key(self.window_key(bucket, length_ms));
            invocation.arg(length_ms).arg(l.limit);
        }
        let invocation = &invocation;
        let sent = self
            .link
            .retrying("rate_limit", |mut conn| async move {
                invocation.invoke_async::<Vec<i64>>(&mut conn).await
            })
            .await;
        let reply = match sent {
            Ok(reply) => reply,
            Err(error) => return Err(Unanswered { error, pending }),
        };
        if reply.first() == Some(&2) {
            let cancelled = (redis::ErrorKind::TypeError, "token reservation cancelled");
            let error = SharedError::Redis(cancelled.into());
            return Err(Unanswered { error, pending });
        }
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
        let mut tightest: Option<RateStatus> = None;
        // `[1, index, used, reset, index, used, reset, …]`; a short reply leaves windows out
        // (settled in the current window, as if the reply was lost).
        let triples = reply.get(1..).unwrap_or_default().chunks_exact(3);
        for ((l, window), chunk) in limits.iter().zip(&mut pending.windows).zip(triples) {
            let &[index, used, reset] = chunk else {
                continue;
            };
            window.1 = index.max(0);
            let [used, reset] = [used, reset].map(|v| v.max(0) as u64);
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
        Ok(Ok((pending, status)))
    }

    /// Replaces a reservation's estimate with what the request used. Applies once however
    /// often it is sent.
    pub async fn settle_tokens(
        &self,
        reservation: &SharedReservation,
        actual: u64,
    ) -> Result<(), SharedError> {
        if reservation.id.is_empty() {
            return Ok(());
        }
        let mut invocation = self.settle_script.prepare_invoke();
        for key in self.reservation_keys(&reservation.bucket, &reservation.id) {
            invocation.key(key);
        }
        // A lost reply (-1) leaves it unknown whether the reservation was made: the marker
        // decides (see SETTLE_TOKENS).
        let lost = reservation.windows.iter().any(|(_, index)| *index < 0);
        invocation.arg(actual).arg(if lost { MARKER_MS } else { 0 });
        for (length_ms, index) in &reservation.windows {
            invocation.key(self.window_key(&reservation.bucket, *length_ms));
            invocation.arg(*length_ms).arg(*index);
        }
        let invocation = &invocation;
        let _: i64 = self
            .link
            .retrying("rate_limit", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(())
    }

    /// [`SharedLimiter::settle_tokens`] off the caller's path, sent again until Redis takes
    /// it: for a settle that failed, and a refund. What a request served without Redis used
    /// is owed instead ([`ReservationGuard::owe`]).
    pub fn settle_tokens_later(self: &Arc<Self>, reservation: SharedReservation, actual: u64) {
        if reservation.id.is_empty() {
            return;
        }
        let limiter = self.clone();
        let reservation = Arc::new(reservation);
        self.link.resend("rate_limit", move || {
            let (limiter, reservation) = (limiter.clone(), reservation.clone());
            async move { limiter.settle_tokens(&reservation, actual).await }
        });
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
