//! Dollar budgets: `usd_per_day` and `usd_per_month` per key, per tenant and per JWT caller,
//! in micro-dollars. In process here; shared by a fleet through Redis in [`shared`].
//!
//! A request reserves its worst case before it is forwarded (its prompt estimate and its
//! completion budget at the most expensive target of its route) in every budget that applies,
//! all or nothing, and settles with what it really cost when it ends; a reservation dropped
//! unsettled (a panic, a dropped future: the client got nothing) is refunded. Windows are UTC
//! calendar days and months: a day's budget resets at 00:00 UTC, a month's on the 1st.
//!
//! Overshoot is bounded: a reservation is checked against what is used and reserved, so only
//! requests already in flight can take a budget past its limit, each by what it cost beyond
//! its reservation (a prompt longer than its estimate; an answer past the assumed completion
//! budget of a request that set no `max_tokens`).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::civil;
use crate::rate_limit::fnv;

/// The response header saying what a whole answer cost, in USD (`0.001900`; `0.000000` for a
/// cache hit or a coalesced answer).
pub const X_LUMEN_COST: http::HeaderName = http::HeaderName::from_static("x-lumen-cost-usd");

/// Money in micro-dollars (USD 1 = 1,000,000): exact sums, no float drift.
pub type Micros = u64;

/// Largest budget accepted, USD 10 million: far above any real one, and small enough that Redis's
/// Lua (doubles, printed with 14 digits) keeps every micro-dollar exact.
pub const MAX_BUDGET_USD: f64 = 10_000_000.0;

/// A `budget:` as written (on a key, a tenant).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    #[serde(default)]
    pub usd_per_month: Option<f64>,
    /// The share of a budget (0–1) at which `lumen_budget_used_ratio` crosses
    /// `lumen_budget_alert_ratio` and the shipped alert fires.
    #[serde(default)]
    pub alert_at: Option<f64>,
}

/// A budget window's length: a UTC calendar day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn label(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The window holding `now_ms` (days or months since 1970) and when it ends, in ms.
    pub fn window(self, now_ms: u64) -> (u64, u64) {
        let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let day = now_ms.div_euclid(86_400_000);
        let (index, end_day) = match self {
            Period::Day => (day, day.saturating_add(1)),
            Period::Month => {
                let (y, m, _) = civil::civil_from_days(day);
                let (ny, nm) = if m == 12 {
                    (y.saturating_add(1), 1)
                } else {
                    (y, m.saturating_add(1))
                };
                (
                    y.saturating_mul(12)
                        .saturating_add(m)
                        .saturating_sub(1)
                        .max(0),
                    civil::days_from_civil(ny, nm, 1),
                )
            }
        };
        let end = end_day.saturating_mul(86_400_000);
        (
            u64::try_from(index).unwrap_or(0),
            u64::try_from(end).unwrap_or(0),
        )
    }
}

/// A validated budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub per_day: Option<Micros>,
    pub per_month: Option<Micros>,
    pub alert_at: Option<f64>,
}

impl Budget {
    /// Validates a `budget:`; the error says what is wrong (the caller adds the path).
    pub fn from_config(c: &BudgetConfig) -> Result<Budget, String> {
        let amount = |name: &str, usd: Option<f64>| -> Result<Option<Micros>, String> {
            match usd {
                None => Ok(None),
                Some(v) if v.is_finite() && v > 0.0 && v <= MAX_BUDGET_USD => Ok(usd_to_micros(v)),
                Some(v) => Err(format!(
                    "{name} must be above 0 and at most {MAX_BUDGET_USD} (got {v})"
                )),
            }
        };
        let per_day = amount("usd_per_day", c.usd_per_day)?;
        let per_month = amount("usd_per_month", c.usd_per_month)?;
        if per_day.is_none() && per_month.is_none() {
            return Err("set usd_per_day, usd_per_month or both".into());
        }
        if let Some(a) = c.alert_at {
            if !(a > 0.0 && a <= 1.0) {
                return Err(format!(
                    "alert_at is a share of the budget, above 0 and at most 1 (got {a})"
                ));
            }
        }
        Ok(Budget {
            per_day,
            per_month,
            alert_at: c.alert_at,
        })
    }

    /// A budget of `usd` per day (a JWT's `budget_usd` claim), if `usd` is a valid amount.
    pub fn per_day_usd(usd: f64) -> Option<Budget> {
        Budget::from_config(&BudgetConfig {
            usd_per_day: Some(usd),
            ..BudgetConfig::default()
        })
        .ok()
    }

    /// (period, limit) of each window, day first.
    pub fn limits(&self) -> impl Iterator<Item = (Period, Micros)> + '_ {
        [(Period::Day, self.per_day), (Period::Month, self.per_month)]
            .into_iter()
            .filter_map(|(p, l)| Some((p, l?)))
    }

    /// This budget cut to `share` (a node's own part while the fleet's store is down).
    pub fn share(&self, share: f64) -> Budget {
        let cut = |l: Micros| ((l as f64) * share.clamp(0.0, 1.0)).floor() as Micros;
        Budget {
            per_day: self.per_day.map(cut),
            per_month: self.per_month.map(cut),
            alert_at: self.alert_at,
        }
    }
}

/// USD as micro-dollars, rounded to the nearest; `None` for a negative or non-finite amount.
pub fn usd_to_micros(usd: f64) -> Option<Micros> {
    (usd.is_finite() && usd >= 0.0).then(|| (usd * 1e6).round() as Micros)
}

/// Micro-dollars as USD with six decimals (`0.000150`): exact, as the headers and logs show it.
pub fn format_usd(m: Micros) -> String {
    format!("{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// Whose budget: a key (static or JWT caller: `key:<id>`) or a tenant (`tenant:<name>`). Key
/// ids of JWT callers start with `jwt:<issuer>:`, so no two sources share a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetId(Arc<str>);

impl BudgetId {
    pub fn key(id: &str) -> BudgetId {
        BudgetId(format!("key:{id}").into())
    }

    pub fn tenant(name: &str) -> BudgetId {
        BudgetId(format!("tenant:{name}").into())
    }

    /// `key:<id>` or `tenant:<name>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `key` or `tenant`.
    pub fn scope(&self) -> &str {
        self.0.split_once(':').map_or("", |(s, _)| s)
    }

    /// The key id or tenant name.
    pub fn name(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, n)| n)
    }
}

/// One budget a request is charged under.
#[derive(Debug, Clone)]
pub struct Charge {
    pub id: BudgetId,
    pub budget: Arc<Budget>,
}

/// What is left of the tightest window after a reservation (`x-lumen-budget-remaining-usd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub remaining: Micros,
    pub reset_after: Duration,
}

/// A refusal: which budget and window, what is left of it, and when it resets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub id: BudgetId,
    pub period: Period,
    pub remaining: Micros,
    pub retry_after: Duration,
}

/// One window of a budget as it stands (`/admin/budgets`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WindowStatus {
    pub period: &'static str,
    pub limit: Micros,
    pub used: Micros,
    pub reserved: Micros,
    pub remaining: Micros,
    pub resets_in_ms: u64,
}

/// Milliseconds since the epoch, by this node's clock.
pub fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One window's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    index: u64,
    used: Micros,
    reserved: Micros,
}

impl Window {
    /// Moves the window on to `index` when it is older (a new day or month starts empty); a
    /// clock set back never rolls it back.
    fn roll(&mut self, index: u64) {
        if index > self.index {
            *self = Window {
                index,
                ..Window::default()
            };
        }
    }

    /// Settles a reservation of `amount` made in window `charged`: the reservation is taken
    /// back where it still stands, and `actual` is spent in the current window (a request
    /// that ran past midnight is charged to the day it ended in).
    fn settle(&mut self, charged: u64, current: u64, amount: Micros, actual: Micros) {
        if self.index == charged {
            self.reserved = self.reserved.saturating_sub(amount);
        }
        self.roll(current);
        self.used = self.used.saturating_add(actual);
    }
}

/// A budget's windows in this process: one per period.
#[derive(Debug, Default)]
struct Account {
    day: Window,
    month: Window,
    /// The budget it was last charged under (a JWT caller's comes with its token).
    budget: Option<Arc<Budget>>,
}

impl Account {
    fn window(&mut self, period: Period) -> &mut Window {
        match period {
            Period::Day => &mut self.day,
            Period::Month => &mut self.month,
        }
    }
}

const SHARDS: usize = 16;

/// Every budget's windows in this process. A shard's lock is held for one map lookup; an
/// account's own lock for a few integer updates, never across an `.await`.
pub struct LocalBudgets {
    shards: Vec<Mutex<HashMap<BudgetId, Arc<Mutex<Account>>>>>,
    /// Reservations so far: every `SWEEP_EVERY`th sweeps one shard of spent-out accounts.
    reserves: AtomicU64,
}

/// How often (in reservations) one shard is swept of accounts whose windows are all past and
/// that nothing holds: JWT callers come and go, and their accounts must not pile up.
const SWEEP_EVERY: u64 = 256;

impl Default for LocalBudgets {
    fn default() -> Self {
        LocalBudgets {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            reserves: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One account a reservation charged, with the window index charged per period.
type Charged = (Arc<Mutex<Account>>, Vec<(Period, u64)>);

/// A reservation held in this process; [`LocalReservation::settle`] it with the real cost.
/// Dropped unsettled, it is refunded.
pub struct LocalReservation {
    parts: Vec<Charged>,
    pub amount: Micros,
    settled: bool,
}

impl Drop for LocalReservation {
    fn drop(&mut self) {
        if !self.settled {
            self.apply(0, SystemTime::now());
        }
    }
}

impl LocalReservation {
    /// Replaces the reservation with `actual`; returns the highest share of a limit now used
    /// per budget charged, in the order the charges were given (for `alert_at`).
    pub fn settle(mut self, actual: Micros, charges: &[Charge], now: SystemTime) -> Vec<f64> {
        self.settled = true;
        self.apply(actual, now);
        self.parts
            .iter()
            .zip(charges)
            .map(|((account, _), charge)| {
                let mut account = lock(account);
                used_ratio(&mut account, &charge.budget, now_ms(now))
            })
            .collect()
    }

    fn apply(&self, actual: Micros, now: SystemTime) {
        let now = now_ms(now);
        for (account, windows) in &self.parts {
            let mut account = lock(account);
            for (period, charged) in windows {
                let (current, _) = period.window(now);
                account
                    .window(*period)
                    .settle(*charged, current, self.amount, actual);
            }
        }
    }
}

fn used_ratio(account: &mut Account, budget: &Budget, now: u64) -> f64 {
    budget
        .limits()
        .map(|(period, limit)| {
            let (index, _) = period.window(now);
            let w = account.window(period);
            w.roll(index);
            w.used as f64 / limit.max(1) as f64
        })
        .fold(0.0, f64::max)
}

impl LocalBudgets {
    /// Drops one shard's accounts that count nothing any more: no reservation holds them and
    /// neither window is the current one (a new day or month would start them empty anyway).
    fn sweep(&self, now: u64) {
        let n = self.reserves.fetch_add(1, Ordering::Relaxed);
        if !n.is_multiple_of(SWEEP_EVERY) {
            return;
        }
        let shard = (n / SWEEP_EVERY) as usize % SHARDS;
        let (day, _) = Period::Day.window(now);
        let (month, _) = Period::Month.window(now);
        #[allow(clippy::indexing_slicing)] // below SHARDS, the length `default` gives
        let mut map = lock(&self.shards[shard]);
        map.retain(|_, account| {
            // Only this map holds it (no reservation, no caller between lookup and lock).
            if Arc::strong_count(account) > 1 {
                return true;
            }
            let a = lock(account);
            a.day.index >= day
                || a.month.index >= month
                || a.day.reserved > 0
                || a.month.reserved > 0
        });
    }

    /// Accounts held now (for tests and reports).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn account(&self, id: &BudgetId) -> Arc<Mutex<Account>> {
        let shard = fnv(id.as_str()) as usize % SHARDS;
        #[allow(clippy::indexing_slicing)] // below SHARDS, the length `default` gives
        let mut map = lock(&self.shards[shard]);
        map.entry(id.clone()).or_default().clone()
    }

    /// Reserves `amount` under every budget of `charges` in each of its windows, or refuses
    /// (all or nothing) when any window would go over. Returns the reservation and what is
    /// left of the tightest window.
    pub fn reserve(
        &self,
        charges: &[Charge],
        amount: Micros,
        now: SystemTime,
    ) -> Result<(LocalReservation, Standing), Exceeded> {
        let now = now_ms(now);
        self.sweep(now);
        let mut reservation = LocalReservation {
            parts: Vec::with_capacity(charges.len()),
            amount,
            settled: false,
        };
        let mut standing: Option<Standing> = None;
        for charge in charges {
            let account = self.account(&charge.id);
            let mut charged = Vec::with_capacity(2);
            {
                let mut a = lock(&account);
                if a.budget
                    .as_ref()
                    .is_none_or(|b| !Arc::ptr_eq(b, &charge.budget))
                {
                    a.budget = Some(charge.budget.clone());
                }
                // Check every window before charging any.
                for (period, limit) in charge.budget.limits() {
                    let (index, end) = period.window(now);
                    let w = a.window(period);
                    w.roll(index);
                    let taken = w.used.saturating_add(w.reserved);
                    let reset_after = Duration::from_millis(end.saturating_sub(now));
                    if taken.saturating_add(amount) > limit {
                        // The charges taken so far are refunded as `reservation` drops.
                        return Err(Exceeded {
                            id: charge.id.clone(),
                            period,
                            remaining: limit.saturating_sub(taken),
                            retry_after: reset_after,
                        });
                    }
                    let left = limit.saturating_sub(taken.saturating_add(amount));
                    if standing.is_none_or(|s| left < s.remaining) {
                        standing = Some(Standing {
                            remaining: left,
                            reset_after,
                        });
                    }
                }
                for (period, _) in charge.budget.limits() {
                    let (index, _) = period.window(now);
                    let w = a.window(period);
                    w.reserved = w.reserved.saturating_add(amount);
                    charged.push((period, index));
                }
            }
            reservation.parts.push((account, charged));
        }
        let standing = standing.unwrap_or(Standing {
            remaining: 0,
            reset_after: Duration::ZERO,
        });
        Ok((reservation, standing))
    }

    /// How each window of `id`'s `budget` stands now.
    pub fn status(&self, id: &BudgetId, budget: &Budget, now: SystemTime) -> Vec<WindowStatus> {
        let now = now_ms(now);
        let account = self.account(id);
        let mut a = lock(&account);
        budget
            .limits()
            .map(|(period, limit)| {
                let (index, end) = period.window(now);
                let w = a.window(period);
                w.roll(index);
                window_status(period, limit, w.used, w.reserved, end.saturating_sub(now))
            })
            .collect()
    }

    /// Every budget this process has charged, with the budget it was last charged under (a
    /// JWT caller's budget is known only once it was used).
    pub fn seen(&self) -> Vec<Charge> {
        let mut seen: Vec<Charge> = self
            .shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .iter()
                    .filter_map(|(id, a)| {
                        let budget = lock(a).budget.clone()?;
                        Some(Charge {
                            id: id.clone(),
                            budget,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        seen.sort_by(|a, b| a.id.cmp(&b.id));
        seen
    }
}

/// A window's status from its counters.
pub fn window_status(
    period: Period,
    limit: Micros,
    used: Micros,
    reserved: Micros,
    resets_in_ms: u64,
) -> WindowStatus {
    WindowStatus {
        period: period.label(),
        limit,
        used,
        reserved,
        remaining: limit.saturating_sub(used.saturating_add(reserved)),
        resets_in_ms,
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    fn at(y: i64, m: i64, d: i64, secs: u64) -> SystemTime {
        let days = civil::days_from_civil(y, m, d) as u64;
        UNIX_EPOCH + Duration::from_secs(days * 86_400 + secs)
    }

    /// The start of today (UTC). A reservation dropped unsettled is refunded at the real
    /// clock's time, so tests that drop one must charge in the real current windows (with a
    /// fixed date they broke when that date passed).
    fn today() -> SystemTime {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400)
    }

    fn charge(id: &str, day: f64, month: Option<f64>) -> Charge {
        Charge {
            id: BudgetId::key(id),
            budget: Arc::new(
                Budget::from_config(&BudgetConfig {
                    usd_per_day: Some(day),
                    usd_per_month: month,
                    alert_at: None,
                })
                .unwrap(),
            ),
        }
    }

    #[test]
    fn windows_are_utc_days_and_calendar_months() {
        let ms = |t: SystemTime| now_ms(t);
        let (d, end) = Period::Day.window(ms(at(2026, 12, 4, 3600)));
        assert_eq!(d as i64, civil::days_from_civil(2026, 12, 4));
        assert_eq!(end, ms(at(2026, 12, 5, 0)));
        let (m, end) = Period::Month.window(ms(at(2026, 12, 31, 86_399)));
        assert_eq!(m, 2026 * 12 + 11);
        assert_eq!(end, ms(at(2027, 1, 1, 0)), "December ends at the new year");
        let (m2, end) = Period::Month.window(ms(at(2028, 2, 1, 0)));
        assert_eq!(m2, 2028 * 12 + 1);
        assert_eq!(end, ms(at(2028, 3, 1, 0)), "a leap February has 29 days");
    }

    #[test]
    fn amounts_are_validated_and_printed_exactly() {
        assert!(Budget::from_config(&BudgetConfig::default()).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e8] {
            let c = BudgetConfig {
                usd_per_day: Some(bad),
                ..BudgetConfig::default()
            };
            assert!(Budget::from_config(&c).is_err(), "{bad}");
        }
        let c = BudgetConfig {
            usd_per_month: Some(5.0),
            alert_at: Some(1.5),
            ..BudgetConfig::default()
        };
        assert!(Budget::from_config(&c).unwrap_err().contains("alert_at"));
        assert_eq!(usd_to_micros(0.1), Some(100_000));
        assert_eq!(format_usd(1_500_001), "1.500001");
        assert_eq!(format_usd(42), "0.000042");
        assert_eq!(
            BudgetId::key("jwt:https://idp:alice").name(),
            "jwt:https://idp:alice"
        );
        assert_eq!(BudgetId::tenant("acme").scope(), "tenant");
    }

    #[test]
    fn reservations_refuse_past_the_limit_settle_and_refund() {
        let book = LocalBudgets::default();
        let now = today();
        let charges = [charge("a", 1.0, None)];
        let (r1, s) = book.reserve(&charges, 600_000, now).unwrap();
        assert_eq!(s.remaining, 400_000);
        let refused = book.reserve(&charges, 500_000, now).err().unwrap();
        assert_eq!(refused.remaining, 400_000);
        assert_eq!(refused.period, Period::Day);
        assert_eq!(refused.retry_after, Duration::from_secs(86_400));
        // Settled for less: the rest is free again.
        let ratios = r1.settle(100_000, &charges, now);
        assert_eq!(ratios, vec![0.1]);
        let (r2, s) = book.reserve(&charges, 500_000, now).unwrap();
        assert_eq!(s.remaining, 400_000);
        drop(r2); // unsettled: refunded
        let st = book.status(&charges[0].id, &charges[0].budget, now);
        assert_eq!(
            (st[0].used, st[0].reserved, st[0].remaining),
            (100_000, 0, 900_000)
        );
    }

    #[test]
    fn all_or_nothing_across_budgets_and_windows() {
        let book = LocalBudgets::default();
        let now = today();
        let key = charge("a", 10.0, Some(1.0));
        let tenant = Charge {
            id: BudgetId::tenant("t"),
            ..charge("t", 2.0, None)
        };
        let both = [key.clone(), tenant.clone()];
        // The month window of the key is the tight one.
        let refused = book.reserve(&both, 1_500_000, now).err().unwrap();
        assert_eq!(
            (refused.id.clone(), refused.period),
            (key.id.clone(), Period::Month)
        );
        // The tenant's budget refuses: nothing stays reserved under the key.
        let (held, _) = book
            .reserve(std::slice::from_ref(&tenant), 1_900_000, now)
            .unwrap();
        assert!(book.reserve(&both, 200_000, now).is_err());
        let st = book.status(&key.id, &key.budget, now);
        assert!(st.iter().all(|w| w.reserved == 0), "{st:?}");
        drop(held);
        assert!(book.reserve(&both, 200_000, now).is_ok());
    }

    #[test]
    fn accounts_of_past_windows_are_swept_and_current_ones_kept() {
        let book = LocalBudgets::default();
        let today = today();
        let yesterday = today - Duration::from_secs(86_400);
        // Many callers, each charged once yesterday and never again.
        for i in 0..2 * SWEEP_EVERY as usize * SHARDS {
            let c = charge(&format!("jwt:idp:{i}"), 1.0, None);
            book.reserve(&[c], 1, yesterday)
                .unwrap()
                .0
                .settle(1, &[], yesterday);
        }
        let kept = charge("today", 1.0, Some(10.0));
        let (held, _) = book.reserve(std::slice::from_ref(&kept), 5, today).unwrap();
        let before = book.len();
        // Reservations today sweep shard after shard.
        for _ in 0..SWEEP_EVERY as usize * SHARDS {
            drop(book.reserve(std::slice::from_ref(&kept), 1, today).unwrap());
        }
        assert!(book.len() < before / 10, "{} of {before} left", book.len());
        // The account in use (and its month window) is kept, with what it holds.
        drop(held);
        let st = book.status(&kept.id, &kept.budget, today);
        assert_eq!(st[0].reserved, 0);
        assert!(book.seen().iter().any(|c| c.id == kept.id));
    }

    #[test]
    fn a_clock_set_back_never_rolls_a_window_back() {
        let book = LocalBudgets::default();
        let charges = [charge("a", 1.0, None)];
        let today = at(2026, 12, 5, 10);
        book.reserve(&charges, 300_000, today)
            .unwrap()
            .0
            .settle(300_000, &charges, today);
        // The clock goes back past midnight: what today spent still counts.
        let earlier = at(2026, 12, 4, 86_000);
        assert!(book.reserve(&charges, 800_000, earlier).is_err());
        let st = book.status(&charges[0].id, &charges[0].budget, earlier);
        assert_eq!(st[0].used, 300_000);
    }

    #[test]
    fn a_request_that_runs_past_midnight_is_charged_to_the_new_day() {
        let book = LocalBudgets::default();
        let charges = [charge("a", 1.0, None)];
        let (r, _) = book
            .reserve(&charges, 300_000, at(2026, 12, 4, 86_399))
            .unwrap();
        let next = at(2026, 12, 5, 1);
        r.settle(250_000, &charges, next);
        let st = book.status(&charges[0].id, &charges[0].budget, next);
        assert_eq!((st[0].used, st[0].reserved), (250_000, 0));
    }
}
