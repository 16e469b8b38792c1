//! Hedged requests: when a route's first target has not answered after a delay (a fixed one,
//! or a percentile of the route's own recent time to first byte), the same request starts on
//! the next eligible target; the first answer to reach the commit point wins, the others are
//! dropped at once (their connections closed, so a provider or sidecar stops generating).
//!
//! A hedge costs an extra upstream call, so a route's hedges are capped at `budget`, a share of
//! its requests over the last minute; and a target of known capacity (a sidecar) listed first
//! is hedged only while requests queue on it (`min_queue`), so cloud spend buys latency only
//! when the local model is the bottleneck.
//!
//! The per-route state ([`RouteHedging`]) is kept by the forwarder by route name, so a reload
//! keeps what was learnt. Everything here is atomics: read and fed on every request of a
//! hedged route.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::raw::RawHedge;

/// When a hedge starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum After {
    Fixed(Duration),
    /// This quantile (0.5 to 0.999) of the route's recent time to first byte.
    Percentile(f64),
}

/// A route's validated hedging.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgePolicy {
    pub after: After,
    pub max: usize,
    pub budget: f64,
    pub min_queue: u32,
}

/// Below this many recent samples a percentile is not trusted: the delay is [`COLD_AFTER`].
const MIN_SAMPLES: u64 = 20;
/// The delay of a percentile hedge before the route has samples enough.
pub const COLD_AFTER: Duration = Duration::from_millis(500);
/// The shortest delay a percentile gives (a hedge at once doubles every call).
const MIN_AFTER: Duration = Duration::from_millis(5);

impl HedgePolicy {
    pub fn build(raw: &RawHedge) -> Result<HedgePolicy, String> {
        let after = match raw.after.strip_prefix('p') {
            Some(q) => {
                let q: f64 = q.parse().map_err(|_| {
                    format!(
                        "after `{}`: a duration (400ms) or a percentile (p95)",
                        raw.after
                    )
                })?;
                if !(50.0..100.0).contains(&q) {
                    return Err(format!(
                        "after `{}`: the percentile must be p50 to p99.9",
                        raw.after
                    ));
                }
                After::Percentile(q / 100.0)
            }
            None => After::Fixed(
                crate::config::units::parse_duration(&raw.after)
                    .map_err(|e| format!("after `{}`: {e}", raw.after))?,
            ),
        };
        if !(1..=3).contains(&raw.max) {
            return Err("max must be 1 to 3".into());
        }
        let budget = match &raw.budget {
            serde_yaml::Value::Number(n) => n.as_f64(),
            serde_yaml::Value::String(s) => s
                .trim()
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .map(|p| p / 100.0),
            _ => None,
        }
        .filter(|b| (0.0..=1.0).contains(b) && *b > 0.0)
        .ok_or("budget must be a share above 0 and at most 100% (`5%` or `0.05`)")?;
        Ok(HedgePolicy {
            after,
            max: raw.max as usize,
            budget,
            min_queue: raw.min_queue,
        })
    }
}

/// TTFT buckets: four per doubling from 1 ms, up to about 65 s.
const BUCKETS: usize = 64;

fn bucket(d: Duration) -> usize {
    let ms = d.as_secs_f64() * 1e3;
    if ms <= 1.0 {
        return 0;
    }
    ((ms.log2() * 4.0) as usize).min(BUCKETS - 1)
}

/// The upper bound of a bucket.
fn bucket_top(b: usize) -> Duration {
    Duration::from_secs_f64(2f64.powf((b as f64 + 1.0) / 4.0) / 1e3)
}

/// A two-minute window: this minute's counts and the last minute's.
struct Minutes<const N: usize> {
    minute: AtomicU64,
    current: [AtomicU64; N],
    previous: [AtomicU64; N],
}

impl<const N: usize> Minutes<N> {
    fn new() -> Self {
        Minutes {
            minute: AtomicU64::new(0),
            current: std::array::from_fn(|_| AtomicU64::new(0)),
            previous: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Moves to `minute` if it is a new one (the first caller of a minute rolls it; a count
    /// racing the roll may land in either minute).
    fn roll(&self, minute: u64) {
        let seen = self.minute.load(Relaxed);
        if seen >= minute
            || self
                .minute
                .compare_exchange(seen, minute, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        let adjacent = minute == seen.saturating_add(1);
        for (cur, prev) in self.current.iter().zip(&self.previous) {
            let moved = cur.swap(0, Relaxed);
            prev.store(if adjacent { moved } else { 0 }, Relaxed);
        }
    }

    fn add(&self, i: usize, minute: u64) {
        self.roll(minute);
        if let Some(c) = self.current.get(i) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The last minute's counts weighted by how much of it is still inside a minute from now
    /// (`into` is the fraction of the current minute gone), plus this minute's.
    fn sliding(&self, i: usize, minute: u64, into: f64) -> f64 {
        self.roll(minute);
        let cur = self.current.get(i).map_or(0, |c| c.load(Relaxed)) as f64;
        let prev = self.previous.get(i).map_or(0, |c| c.load(Relaxed)) as f64;
        cur + prev * (1.0 - into)
    }

    /// Both minutes' counts.
    fn both(&self, i: usize, minute: u64) -> u64 {
        self.roll(minute);
        let cur = self.current.get(i).map_or(0, |c| c.load(Relaxed));
        let prev = self.previous.get(i).map_or(0, |c| c.load(Relaxed));
        cur.saturating_add(prev)
    }
}

const REQUESTS: usize = 0;
const HEDGES: usize = 1;

/// What a route learnt for hedging: its recent requests and hedges (the budget), and its
/// recent times to first byte (the percentile delay).
pub struct RouteHedging {
    epoch: Instant,
    counts: Minutes<2>,
    ttft: Minutes<BUCKETS>,
}

impl Default for RouteHedging {
    fn default() -> Self {
        RouteHedging {
            epoch: Instant::now(),
            counts: Minutes::new(),
            ttft: Minutes::new(),
        }
    }
}

impl RouteHedging {
    fn clock(&self) -> (u64, f64) {
        let secs = self.epoch.elapsed().as_secs_f64();
        let minute = (secs / 60.0) as u64;
        (minute.saturating_add(1), (secs % 60.0) / 60.0)
    }

    /// Counts a request of the route (the budget's denominator).
    pub fn note_request(&self) {
        let (minute, _) = self.clock();
        self.counts.add(REQUESTS, minute);
    }

    /// Whether one more hedge fits the budget: the route's hedges over the last minute stay
    /// within `share` of its requests. Counted by [`RouteHedging::count_hedge`] once it starts.
    pub fn may_hedge(&self, share: f64) -> bool {
        let (minute, into) = self.clock();
        let requests = self.counts.sliding(REQUESTS, minute, into);
        let hedges = self.counts.sliding(HEDGES, minute, into);
        hedges + 1.0 <= requests * share
    }

    /// A hedge started.
    pub fn count_hedge(&self) {
        let (minute, _) = self.clock();
        self.counts.add(HEDGES, minute);
    }

    /// A time to first byte of the route's (every committed answer's).
    pub fn observe_ttft(&self, d: Duration) {
        let (minute, _) = self.clock();
        self.ttft.add(bucket(d), minute);
    }

    /// The `q` quantile of recent times to first byte (a bucket's upper bound), once there
    /// are samples enough.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let (minute, _) = self.clock();
        let counts: Vec<u64> = (0..BUCKETS).map(|b| self.ttft.both(b, minute)).collect();
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            return None;
        }
        let rank = (total as f64 * q).ceil() as u64;
        let mut seen = 0u64;
        for (b, n) in counts.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return Some(bucket_top(b));
            }
        }
        None
    }

    /// When a hedge of this route starts, after the first attempt did.
    pub fn delay(&self, after: After) -> Duration {
        match after {
            After::Fixed(d) => d,
            After::Percentile(q) => self.percentile(q).map_or(COLD_AFTER, |d| d.max(MIN_AFTER)),
        }
    }
}

/// Every hedged route's state, by route name; outlives reloads.
#[derive(Default)]
pub struct Hedging {
    routes: ArcSwap<HashMap<String, Arc<RouteHedging>>>,
}

impl Hedging {
    pub fn route(&self, name: &str) -> Arc<RouteHedging> {
        if let Some(r) = self.routes.load().get(name) {
            return r.clone();
        }
        self.routes.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(name.to_string()).or_default();
            map
        });
        self.routes.load().get(name).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_budget() -> serde_yaml::Value {
        serde_yaml::Value::String("5%".into())
    }

    fn raw(after: &str, budget: serde_yaml::Value) -> RawHedge {
        RawHedge {
            after: after.into(),
            max: 1,
            budget,
            min_queue: 1,
        }
    }

    #[test]
    fn policies_are_read_and_bad_ones_refused() {
        let p = HedgePolicy::build(&raw("400ms", default_budget())).unwrap();
        assert_eq!(p.after, After::Fixed(Duration::from_millis(400)));
        assert!((p.budget - 0.05).abs() < 1e-9);
        let p = HedgePolicy::build(&raw("p95", serde_yaml::Value::from(0.1))).unwrap();
        assert_eq!(p.after, After::Percentile(0.95));
        assert!((p.budget - 0.1).abs() < 1e-9);
        for bad in ["p10", "p100", "soon", "px"] {
            assert!(
                HedgePolicy::build(&raw(bad, default_budget())).is_err(),
                "{bad}"
            );
        }
        for bad in ["0%", "150%", "lots"] {
            let b = serde_yaml::Value::String(bad.into());
            assert!(HedgePolicy::build(&raw("1s", b)).is_err(), "{bad}");
        }
        let mut many = raw("1s", default_budget());
        many.max = 4;
        assert!(HedgePolicy::build(&many).is_err());
    }

    #[test]
    fn the_budget_caps_hedges_at_their_share_of_requests() {
        let r = RouteHedging::default();
        assert!(!r.may_hedge(0.05), "no traffic yet: no budget");
        for _ in 0..100 {
            r.note_request();
        }
        let taken = (0..20)
            .filter(|_| {
                let may = r.may_hedge(0.05);
                if may {
                    r.count_hedge();
                }
                may
            })
            .count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn the_percentile_delay_follows_the_routes_ttft() {
        let r = RouteHedging::default();
        assert_eq!(r.delay(After::Percentile(0.95)), COLD_AFTER);
        for _ in 0..95 {
            r.observe_ttft(Duration::from_millis(50));
        }
        for _ in 0..5 {
            r.observe_ttft(Duration::from_secs(2));
        }
        let p95 = r.delay(After::Percentile(0.95));
        assert!(
            p95 >= Duration::from_millis(50) && p95 < Duration::from_millis(70),
            "{p95:?}"
        );
        let p99 = r.delay(After::Percentile(0.99));
        assert!(
            p99 >= Duration::from_secs(2) && p99 < Duration::from_millis(2400),
            "{p99:?}"
        );
        assert_eq!(
            r.delay(After::Fixed(Duration::from_millis(7))),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn minutes_roll_over() {
        let m: Minutes<1> = Minutes::new();
        m.add(0, 1);
        m.add(0, 1);
        assert_eq!(m.both(0, 1), 2);
        m.add(0, 2);
        assert_eq!(m.both(0, 2), 3, "the last minute still counts");
        assert!((m.sliding(0, 2, 0.5) - 2.0).abs() < 1e-9);
        assert_eq!(m.both(0, 4), 0, "two minutes later nothing is left");
    }
}
