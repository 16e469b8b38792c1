//! The last minutes of traffic as a time series, for the admin console's charts
//! (`GET /admin/timeseries`): a background sampler reads the metric totals every
//! [`INTERVAL`] and keeps one point per interval, computed from the difference with the sample
//! before, in a ring of [`POINTS`] (15 minutes).
//!
//! Sampling here rather than in the page means a console opened now shows the minutes before
//! it was opened, and every open console (or script) sees the same points.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::proto::MetricFamily;
use serde::Serialize;
use utoipa::ToSchema;

use crate::metrics::{merged_histogram, sum_by, Metrics};
use lumen_plugins::cache::store::now_ms;

/// Time between two points.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Points kept: 15 minutes at [`INTERVAL`].
pub const POINTS: usize = 450;

/// One interval of traffic. Ratios and quantiles are absent when the interval had no request
/// to compute them from (a chart shows a gap, not a misleading zero).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Point {
    /// End of the interval, Unix milliseconds.
    pub t: u64,
    /// Requests answered per second (any status).
    pub requests_per_s: f64,
    /// Share of answers with a 5xx status.
    pub error_ratio: Option<f64>,
    /// Request latency quantiles, milliseconds (head to last byte).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Time to first token quantiles, milliseconds.
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// Hits (stored or coalesced) over cache lookups.
    pub cache_hit_ratio: Option<f64>,
    /// Requests refused by a rate limit, per second.
    pub rate_limited_per_s: f64,
    /// Prompt and completion tokens, per second.
    pub tokens_per_s: f64,
}

/// `GET /admin/timeseries`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Timeseries {
    /// Milliseconds between points.
    pub interval_ms: u64,
    /// Oldest first; at most 15 minutes.
    pub points: Vec<Point>,
}

/// Cumulative histogram: (upper bound in seconds, count at or below it), ending with `+Inf`.
#[derive(Debug, Clone, Default, PartialEq)]
struct Buckets(Vec<(f64, u64)>);

/// The metric totals at one instant.
#[derive(Debug, Clone, Default)]
struct Totals {
    at_ms: u64,
    requests: u64,
    errors: u64,
    rate_limited: u64,
    cache_hits: u64,
    cache_lookups: u64,
    tokens: u64,
    duration: Buckets,
    ttft: Buckets,
}

/// The ring of points, shared between the sampler and the admin app.
#[derive(Default)]
pub struct History {
    inner: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    last: Option<Totals>,
    points: VecDeque<Point>,
}

impl History {
    /// Takes a sample now and appends the point since the previous one.
    pub fn sample(&self, metrics: &Metrics) {
        let now = totals(&metrics.registry.gather(), now_ms());
        let mut ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(before) = &ring.last {
            if let Some(point) = point(before, &now) {
                if ring.points.len() == POINTS {
                    ring.points.pop_front();
                }
                ring.points.push_back(point);
            }
        }
        ring.last = Some(now);
    }

    /// Points newer than `since_ms` (Unix ms), oldest first.
    pub fn since(&self, since_ms: u64) -> Timeseries {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Timeseries {
            interval_ms: INTERVAL.as_millis() as u64,
            points: ring
                .points
                .iter()
                .filter(|p| p.t > since_ms)
                .cloned()
                .collect(),
        }
    }
}

fn totals(families: &[MetricFamily], at_ms: u64) -> Totals {
    let total = |name: &str| {
        sum_by(families, name, None)
            .get("total")
            .copied()
            .unwrap_or(0)
    };
    let statuses = sum_by(families, "lumen_requests_total", Some("status"));
    let results = sum_by(families, "lumen_cache_requests_total", Some("result"));
    let sum_where = |map: &BTreeMap<String, u64>, keep: fn(&str) -> bool| -> u64 {
        map.iter().filter(|(k, _)| keep(k)).map(|(_, n)| n).sum()
    };
    Totals {
        at_ms,
        requests: statuses.values().sum(),
        errors: sum_where(&statuses, |status| status.starts_with('5')),
        rate_limited: total("lumen_rate_limited_total"),
        cache_hits: sum_where(&results, |r| matches!(r, "hit" | "coalesced")),
        cache_lookups: results.values().sum(),
        tokens: total("lumen_tokens_total"),
        duration: Buckets(merged_histogram(families, "lumen_request_duration_seconds")),
        ttft: Buckets(merged_histogram(
            families,
            "lumen_time_to_first_token_seconds",
        )),
    }
}

/// The point between two samples; `None` when the clock went backwards.
fn point(before: &Totals, now: &Totals) -> Option<Point> {
    let secs = now.at_ms.checked_sub(before.at_ms)? as f64 / 1000.0;
    if secs <= 0.0 {
        return None;
    }
    let requests = now.requests.saturating_sub(before.requests);
    let ratio = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
    let lookups = now.cache_lookups.saturating_sub(before.cache_lookups);
    let duration = delta(&before.duration, &now.duration);
    let ttft = delta(&before.ttft, &now.ttft);
    let ms = |b: &[(f64, u64)], q: f64| quantile(b, q).map(|s| round(s * 1000.0));
    Some(Point {
        t: now.at_ms,
        requests_per_s: round(requests as f64 / secs),
        error_ratio: ratio(now.errors.saturating_sub(before.errors), requests),
        p50_ms: ms(&duration, 0.5),
        p99_ms: ms(&duration, 0.99),
        ttft_p50_ms: ms(&ttft, 0.5),
        ttft_p99_ms: ms(&ttft, 0.99),
        cache_hit_ratio: ratio(now.cache_hits.saturating_sub(before.cache_hits), lookups),
        rate_limited_per_s: round(
            now.rate_limited.saturating_sub(before.rate_limited) as f64 / secs,
        ),
        tokens_per_s: round(now.tokens.saturating_sub(before.tokens) as f64 / secs),
    })
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// What was observed between two cumulative histograms (bounds as in `now`).
fn delta(before: &Buckets, now: &Buckets) -> Vec<(f64, u64)> {
    now.0
        .iter()
        .map(|&(bound, count)| {
            let earlier = before
                .0
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |(_, c)| *c);
            (bound, count.saturating_sub(earlier))
        })
        .collect()
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside its bucket (as
/// Prometheus' `histogram_quantile` does). A quantile in the `+Inf` bucket is the last finite
/// bound.
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if !bound.is_finite() {
                return Some(lower.0);
            }
            let in_bucket = count.saturating_sub(lower.1) as f64;
            if in_bucket == 0.0 {
                return Some(bound);
            }
            return Some(lower.0 + (bound - lower.0) * (rank - lower.1 as f64) / in_bucket);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

/// The background service that samples every [`INTERVAL`].
pub struct Sampler {
    pub history: Arc<History>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl BackgroundService for Sampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.history.sample(&self.metrics),
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals_at(at_ms: u64, requests: u64, errors: u64, hist: &[(f64, u64)]) -> Totals {
        Totals {
            at_ms,
            requests,
            errors,
            duration: Buckets(hist.to_vec()),
            ..Totals::default()
        }
    }

    #[test]
    fn a_point_is_the_difference_between_two_samples() {
        let before = totals_at(1_000, 10, 1, &[(0.1, 10), (1.0, 10)]);
        // 20 more requests in 2 s: 10 under 100 ms, 10 between 100 ms and 1 s; 5 were 5xx.
        let now = totals_at(3_000, 30, 6, &[(0.1, 20), (1.0, 30)]);
        let p = point(&before, &now).unwrap();
        assert_eq!(p.requests_per_s, 10.0);
        assert_eq!(p.error_ratio, Some(0.25));
        // The median is the 10th of 20: the top of the first bucket.
        assert_eq!(p.p50_ms, Some(100.0));
        // p99 (19.8th) lies near the top of the second bucket.
        assert!(
            p.p99_ms.unwrap() > 900.0 && p.p99_ms.unwrap() <= 1000.0,
            "{p:?}"
        );
        // No cache lookups, no time to first token: absent, not zero.
        assert_eq!(p.cache_hit_ratio, None);
        assert_eq!(p.ttft_p50_ms, None);
    }

    #[test]
    fn an_idle_interval_has_a_rate_of_zero_and_no_quantiles() {
        let before = totals_at(1_000, 10, 0, &[(0.1, 10)]);
        let now = totals_at(3_000, 10, 0, &[(0.1, 10)]);
        let p = point(&before, &now).unwrap();
        assert_eq!(p.requests_per_s, 0.0);
        assert_eq!(p.error_ratio, None);
        assert_eq!(p.p99_ms, None);
        assert!(point(&now, &before).is_none(), "clock went backwards");
    }

    #[test]
    fn samples_beyond_the_last_bound_count_at_it() {
        // 10 samples, 9 of them over the last finite bound (1 s).
        let b = [(0.1, 1), (1.0, 1), (f64::INFINITY, 10)];
        assert_eq!(quantile(&b, 0.99), Some(1.0));
        assert_eq!(quantile(&b, 0.05), Some(0.05));
    }

    #[test]
    fn the_ring_keeps_the_last_fifteen_minutes_of_real_traffic() {
        let metrics = Metrics::new();
        let history = History::default();
        history.sample(&metrics);
        metrics
            .requests
            .with_label_values(&["chat", "fast", "mock", "200"])
            .inc_by(4);
        metrics
            .requests
            .with_label_values(&["chat", "fast", "mock", "502"])
            .inc();
        std::thread::sleep(Duration::from_millis(20));
        history.sample(&metrics);
        let series = history.since(0);
        assert_eq!(series.points.len(), 1);
        assert_eq!(series.points[0].error_ratio, Some(0.2));
        assert!(series.points[0].requests_per_s > 0.0);
        assert!(history.since(series.points[0].t).points.is_empty());
        for _ in 0..POINTS + 5 {
            std::thread::sleep(Duration::from_millis(1));
            history.sample(&metrics);
        }
        assert_eq!(history.since(0).points.len(), POINTS);
    }
}
