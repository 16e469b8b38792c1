//! Dollar budgets shared by every node that points at the same Redis: one atomic script per
//! reservation and one per settlement, on Redis's own clock (nodes with skewed clocks agree on
//! when a UTC day or month ends).
//!
//! One hash per budget and window length, `{prefix:budgets}:<id>:<day|month>`, holding the
//! window's number (`i`), what was spent in it (`u`) and what requests in flight hold (`r`). All
//! budgets share one hash tag so that a request's key and tenant budgets are checked and
//! charged in one script. Keys expire a day after their window ends.
//!
//! A node that dies with requests in flight leaves their reservations held until the window
//! resets; a request whose node lives settles (or, dropped unsettled, refunds) its own.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::Duration;

use super::{window_status, BudgetId, Charge, Exceeded, Micros, Period, Standing, WindowStatus};
use crate::redis_link::owed::{owe, Charge as OwedCharge, Creditor, Owed};
use crate::redis_link::{RedisLink, SharedError, Unanswered};

/// The window of a period at Redis time `now` (seconds): its number and its end (seconds).
/// Days and calendar months in UTC (Howard Hinnant's date algorithms, as `civil.rs`).
const WINDOWS: &str = r"
local function window(period, s)
  local day = math.floor(s / 86400)
  if period == 'd' then return day, (day + 1) * 86400 end
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if m == 12 then ny, nm = y + 1, 1 end
  -- days_from_civil(ny, nm, 1)
  local yy = ny
  if nm <= 2 then yy = yy - 1 end
  local era2 = math.floor(yy / 400)
  local yoe2 = yy - era2 * 400
  local mp2 = (nm + 9) % 12
  local doy2 = math.floor((153 * mp2 + 2) / 5)
  local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100) + doy2
  return y * 12 + m - 1, (era2 * 146097 + doe2 - 719468) * 86400
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = tonumber(t[1])
";

/// Shared by the scripts below. `release` gives back a held reservation: its amount leaves the
/// `r` of every window it was charged in (where that window still stands), and its record
/// goes. `sweep` releases the reservations held past their time (their requests' nodes died,
/// or could not settle). `current` reads a window hash as it stands for the window of `now`:
/// an older one counts as empty (a new day or month), and a newer one (written by a clock
/// ahead of this one, before a failover) is never rolled back.
/// KEYS[1]: the held set (id → expiry ms); KEYS[2]: the records (id → JSON `{"a": amount,
/// "w": [[key, index], …]}`: key names hold client-chosen text, such as a JWT's subject, so
/// they are never split on a character).
const COMMON: &str = r"
local function release(id)
  local rec = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if not rec then return end
  local held = cjson.decode(rec)
  local amount = tonumber(held.a) or 0
  for _, w in ipairs(held.w) do
    local key, charged = w[1], tonumber(w[2])
    if tonumber(redis.call('HGET', key, 'i')) == charged then
      local r = (tonumber(redis.call('HGET', key, 'r')) or 0) - amount
      if r < 0 then r = 0 end
      redis.call('HSET', key, 'r', r)
    end
  end
end
local function sweep()
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, 100)) do
    release(old)
  end
end
local function current(key, period)
  local i, e = window(period, now_s)
  local got = redis.call('HMGET', key, 'i', 'u', 'r')
  local stored = tonumber(got[1])
  if stored and stored >= i then
    return stored, e, tonumber(got[2]) or 0, tonumber(got[3]) or 0
  end
  return i, e, 0, 0
end
";

/// KEYS: the held set, the records, this reservation's settled marker, then one hash per
/// (budget, window). ARGV: reservation id, amount, ms it may stay held, then (period `d`/`m`,
/// limit) per window key. All or nothing. A retry of a reservation that was made reserves
/// nothing more; one that arrives after it was cancelled (settled) reserves nothing.
/// Returns {1, (index, remaining, ms to reset) per window}, {0, window number (from 1),
/// remaining, ms to reset}, or {2} when cancelled.
const RESERVE: &str = r"
sweep()
if redis.call('EXISTS', KEYS[3]) == 1 then return {2} end
local id, amount = ARGV[1], tonumber(ARGV[2])
local again = redis.call('ZSCORE', KEYS[1], id)
local n = #KEYS - 3
local idx, ends, u, r = {}, {}, {}, {}
for j = 1, n do
  local limit = tonumber(ARGV[3 + 2 * j])
  idx[j], ends[j], u[j], r[j] = current(KEYS[3 + j], ARGV[2 + 2 * j])
  if not again and u[j] + r[j] + amount > limit then
    local left = limit - u[j] - r[j]
    if left < 0 then left = 0 end
    return {0, j, left, ends[j] * 1000 - now_ms}
  end
end
local out = {1}
local rec = {}
for j = 1, n do
  local key, limit = KEYS[3 + j], tonumber(ARGV[3 + 2 * j])
  if not again then
    r[j] = r[j] + amount
    redis.call('HSET', key, 'i', idx[j], 'u', u[j], 'r', r[j])
    redis.call('PEXPIREAT', key, (ends[j] + 86400) * 1000)
  end
  table.insert(rec, {key, idx[j]})
  local left = limit - u[j] - r[j]
  if left < 0 then left = 0 end
  table.insert(out, idx[j])
  table.insert(out, left)
  table.insert(out, ends[j] * 1000 - now_ms)
end
if not again then
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), id)
  redis.call('HSET', KEYS[2], id, cjson.encode({a = amount, w = rec}))
end
return out
";

/// KEYS as for RESERVE. ARGV: reservation id, actual cost, ms the settled marker lives, then
/// the period per window key. The reservation is released (where it still stands) and the
/// cost spent in each current window, once: a retried settlement finds its marker and does
/// nothing, and a reservation that arrives after it is not made. Returns what is spent now in
/// each window.
const SETTLE: &str = r"
sweep()
local first = redis.call('SET', KEYS[3], '1', 'NX', 'PX', tonumber(ARGV[3]))
local actual = tonumber(ARGV[2])
if first then release(ARGV[1]) end
local out = {}
for j = 1, #KEYS - 3 do
  local key = KEYS[3 + j]
  local i, e, u, r = current(key, ARGV[3 + j])
  if first then
    u = u + actual
    redis.call('HSET', key, 'i', i, 'u', u, 'r', r)
    redis.call('PEXPIREAT', key, (e + 86400) * 1000)
  end
  table.insert(out, u)
end
return out
";

/// KEYS: the held set, the records, then one hash per (budget, window); ARGV: the period per
/// window key. Returns (used, reserved, ms to reset) per window.
const STATUS: &str = r"
sweep()
local out = {}
for j = 1, #KEYS - 2 do
  local i, e, u, r = current(KEYS[2 + j], ARGV[j])
  table.insert(out, u)
  table.insert(out, r)
  table.insert(out, e * 1000 - now_ms)
end
return out
";

/// How long a reservation stays held at most: a node that dies mid-request (or cannot settle)
/// holds budget for no longer than this.
pub const HELD_AT_MOST: Duration = Duration::from_secs(600);

/// A reservation held in Redis for one request, named by a gateway-made id.
#[derive(Debug, Clone)]
pub struct SharedReservation {
    id: String,
    /// (key, period) per window charged.
    windows: Vec<(String, Period)>,
    pub amount: Micros,
}

/// The budgets in Redis.
pub struct SharedBudgets {
    link: Arc<RedisLink>,
    prefix: String,
    /// How long a reservation stays held at most ([`HELD_AT_MOST`]).
    held_at_most: Duration,
    reserve: redis::Script,
    settle: redis::Script,
    status: redis::Script,
    /// What requests served while Redis could not be asked owe the budgets' windows.
    owed: Owed<SharedBudgets>,
}

impl Creditor for SharedBudgets {
    /// The windows charged, as a reservation names them.
    type Target = Vec<(String, Period)>;
    const OP: &'static str = "budget";

    fn owed(&self) -> &Owed<SharedBudgets> {
        &self.owed
    }

    fn charge(self: Arc<Self>, windows: Self::Target, id: String, amount: u64) -> OwedCharge {
        Box::pin(async move {
            // A settlement of a reservation never made: it spends `amount`, once.
            let none = SharedReservation {
                id,
                windows,
                amount: 0,
            };
            self.settle(&none, amount).await.map(drop)
        })
    }
}

fn code(period: Period) -> &'static str {
    match period {
        Period::Day => "d",
        Period::Month => "m",
    }
}

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{WINDOWS}{COMMON}{body}"))
}

impl SharedBudgets {
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> SharedBudgets {
        SharedBudgets {
            link,
            prefix: prefix.to_string(),
            held_at_most: HELD_AT_MOST,
            reserve: script(RESERVE),
            settle: script(SETTLE),
            status: script(STATUS),
            owed: Owed::default(),
        }
    }

    /// These budgets with reservations held for at most `held` (tests; the default is
    /// [`HELD_AT_MOST`]).
    pub fn holding_for(mut self, held: Duration) -> SharedBudgets {
        self.held_at_most = held;
        self
    }

    fn key(&self, id: &BudgetId, period: Period) -> String {
        format!(
            "{{{}:budgets}}:{}:{}",
            self.prefix,
            id.as_str(),
            period.label()
        )
    }

    /// The held set and the records of reservations (see RESERVE).
    fn held(&self) -> [String; 2] {
        [
            format!("{{{}:budgets}}:held", self.prefix),
            format!("{{{}:budgets}}:held:records", self.prefix),
        ]
    }

    /// This reservation's settled marker: set once it is settled (or cancelled).
    fn marker(&self, id: &str) -> String {
        format!("{{{}:budgets}}:settled:{id}", self.prefix)
    }

    /// Reserves `amount` under every budget of `charges`, fleet-wide, all or nothing. When
    /// Redis does not answer, the reservation (which may have been made, or may be still on
    /// its way) comes back as `pending`: the caller cancels it ([`SharedBudgets::cancel_later`])
    /// or, having served the request anyway, settles it with its cost once Redis answers
    /// ([`SharedBudgets::settle_later`]), so the fleet's totals still add up.
    pub async fn reserve(
        self: &Arc<Self>,
        charges: &[Charge],
        amount: Micros,
    ) -> Result<Result<(SharedReservation, Standing), Exceeded>, Unanswered<SharedReservation>>
    {
        // Gateway-made, never the client's: a retried call finds its own reservation.
        let id = match crate::redis_link::write_id() {
            Ok(id) => id,
            Err(error) => {
                // Nothing was sent: nothing to cancel; what the request spends is still owed
                // to these windows.
                let windows = charges
                    .iter()
                    .flat_map(|c| c.budget.limits().map(|(p, _)| (self.key(&c.id, p), p)))
                    .collect();
                let pending = SharedReservation {
                    id: String::new(),
                    windows,
                    amount,
                };
                return Err(Unanswered { error, pending });
            }
        };
        let mut invocation = self.reserve.prepare_invoke();
        for key in self.held() {
            invocation.key(key);
        }
        invocation.key(self.marker(&id));
        invocation
            .arg(&id)
            .arg(amount)
            .arg(self.held_at_most.as_millis() as u64);
        let mut which = Vec::new();
        for charge in charges {
            for (period, limit) in charge.budget.limits() {
                let key = self.key(&charge.id, period);
                invocation.key(&key).arg(code(period)).arg(limit);
                which.push((key, charge.id.clone(), period));
            }
        }
        let invocation = &invocation;
        let sent = self
            .link
            .retrying("budget", |mut conn| async move {
                invocation.invoke_async::<Vec<i64>>(&mut conn).await
            })
            .await;
        let unanswered =
            |error: SharedError, id: String, which: Vec<(String, BudgetId, Period)>| {
                let pending = SharedReservation {
                    id,
                    windows: which.into_iter().map(|(key, _, p)| (key, p)).collect(),
                    amount,
                };
                Err(Unanswered { error, pending })
            };
        let reply = match sent {
            Ok(reply) => reply,
            Err(e) => return unanswered(e, id, which),
        };
        let at = |n: usize| reply.get(n).copied().unwrap_or(0).max(0) as u64;
        if reply.first() == Some(&2) {
            let cancelled = (redis::ErrorKind::TypeError, "budget reservation cancelled");
            return unanswered(SharedError::Redis(cancelled.into()), id, which);
        }
        if reply.first() == Some(&0) {
            let k = (at(1).max(1) as usize).saturating_sub(1);
            let Some((_, budget, period)) = which.get(k) else {
                let bad = (redis::ErrorKind::TypeError, "budget script: bad refusal");
                return unanswered(SharedError::Redis(bad.into()), id, which);
            };
            return Ok(Err(Exceeded {
                id: budget.clone(),
                period: *period,
                remaining: at(2),
                retry_after: Duration::from_millis(at(3)),
            }));
        }
        let mut windows = Vec::with_capacity(which.len());
        let mut standing: Option<Standing> = None;
        let triples = reply.get(1..).unwrap_or_default().chunks_exact(3);
        for ((key, _, period), t) in which.into_iter().zip(triples) {
            let &[_, left, reset] = t else { continue };
            let [left, reset] = [left, reset].map(|v| v.max(0) as u64);
            windows.push((key, period));
            if standing.is_none_or(|s| left < s.remaining) {
                standing = Some(Standing {
                    remaining: left,
                    reset_after: Duration::from_millis(reset),
                });
            }
        }
        let standing = standing.unwrap_or(Standing {
            remaining: 0,
            reset_after: Duration::ZERO,
        });
        Ok(Ok((
            SharedReservation {
                id,
                windows,
                amount,
            },
            standing,
        )))
    }

    /// Replaces a reservation with the real cost; returns what is spent now in each window
    /// charged, in order. Safe to call again (after an error): a settlement applies once.
    pub async fn settle(
        &self,
        reservation: &SharedReservation,
        actual: Micros,
    ) -> Result<Vec<Micros>, SharedError> {
        let mut invocation = self.settle.prepare_invoke();
        for key in self.held() {
            invocation.key(key);
        }
        invocation.key(self.marker(&reservation.id));
        // The marker must outlive every retry of this settlement (and a reservation still on
        // its way), not the day.
        let marker_ms = self.held_at_most.as_millis().saturating_mul(2) as u64;
        invocation
            .arg(&reservation.id)
            .arg(actual)
            .arg(marker_ms.max(1000));
        for (key, period) in &reservation.windows {
            invocation.key(key).arg(code(*period));
        }
        let invocation = &invocation;
        let spent: Vec<i64> = self
            .link
            .retrying("budget", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(spent.into_iter().map(|v| v.max(0) as u64).collect())
    }

    /// Settles `reservation` at `actual` off the caller's path, sent again until Redis takes
    /// it (a settlement applies once however often it is sent): for a settle that failed on
    /// the request's path, and for a refund (see [`SharedBudgets::cancel_later`]). What a
    /// request served without Redis spent is owed instead ([`SharedBudgetGuard::owe`]).
    pub fn settle_later(self: &Arc<Self>, reservation: SharedReservation, actual: Micros) {
        if reservation.id.is_empty() {
            return;
        }
        let budgets = self.clone();
        let reservation = Arc::new(reservation);
        self.link.resend("budget", move || {
            let (budgets, reservation) = (budgets.clone(), reservation.clone());
            async move { budgets.settle(&reservation, actual).await.map(drop) }
        });
    }

    /// Settles `reservation` at nothing off the request's path: a reservation whose reply was
    /// lost, or whose request ended without a cost, is given back now rather than when held
    /// past its time.
    pub fn cancel_later(self: &Arc<Self>, reservation: SharedReservation) {
        self.settle_later(reservation, 0);
    }

    /// How each window of `charge`'s budget stands now, fleet-wide.
    pub async fn status(&self, charge: &Charge) -> Result<Vec<WindowStatus>, SharedError> {
        let mut invocation = self.status.prepare_invoke();
        for key in self.held() {
            invocation.key(key);
        }
        let limits: Vec<(Period, Micros)> = charge.budget.limits().collect();
        for (period, _) in &limits {
            invocation
                .key(self.key(&charge.id, *period))
                .arg(code(*period));
        }
        let invocation = &invocation;
        let reply: Vec<i64> = self
            .link
            .retrying("budget", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(limits
            .iter()
            .zip(reply.chunks_exact(3))
            .filter_map(|((period, limit), t)| {
                let &[used, reserved, reset] = t else {
                    return None;
                };
                let [used, reserved, reset] = [used, reserved, reset].map(|v| v.max(0) as u64);
                Some(window_status(*period, *limit, used, reserved, reset))
            })
            .collect())
    }
}

/// A fleet-wide reservation held for one request: settled by the pipeline, or refunded off the
/// request's path when dropped unsettled.
pub struct SharedBudgetGuard {
    budgets: Arc<SharedBudgets>,
    reservation: Option<SharedReservation>,
    /// Whether the reservation may have been made (false: Redis surely never saw it).
    made: bool,
}

impl SharedBudgetGuard {
    pub fn new(budgets: Arc<SharedBudgets>, reservation: SharedReservation) -> SharedBudgetGuard {
        SharedBudgetGuard {
            budgets,
            reservation: Some(reservation),
            made: true,
        }
    }

    /// A reservation Redis did not answer, for a request served on the node's own count.
    pub fn unanswered(
        budgets: Arc<SharedBudgets>,
        unanswered: Unanswered<SharedReservation>,
    ) -> SharedBudgetGuard {
        SharedBudgetGuard {
            budgets,
            reservation: Some(unanswered.pending),
            made: unanswered.error.may_have_run(),
        }
    }

    /// Charges `actual` to the budgets of an [`SharedBudgetGuard::unanswered`] reservation once
    /// Redis answers: added to what this node owes those budgets (one write per budget,
    /// however many requests), and the reservation, if it may have been made, released by its
    /// id.
    pub fn owe(mut self, actual: Micros) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        owe(&self.budgets, reservation.windows.clone(), actual);
        if self.made {
            // What it may hold is given back by its own id (dropped in a long outage, it is
            // released once held past its time).
            self.budgets.cancel_later(reservation);
        }
    }

    /// The reservation, to settle it; the guard then has nothing left to refund.
    pub fn take(&mut self) -> Option<SharedReservation> {
        self.reservation.take()
    }
}

impl Drop for SharedBudgetGuard {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take().filter(|_| self.made) else {
            return;
        };
        self.budgets.cancel_later(reservation);
    }
}
