//! Prometheus metrics, in one registry that every part of the gateway registers into.
//!
//! Labels are bounded: route names come from the config (never the client's raw model string),
//! providers from the config, statuses from a fixed set, endpoints from a fixed set.

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Every metric the gateway exports.
pub struct Metrics {
    pub registry: Registry,
    /// `lumen_requests_total{endpoint, route, provider, status}`.
    pub requests: IntCounterVec,
    /// `lumen_request_duration_seconds{endpoint, route}`: from request head to last byte.
    pub duration: HistogramVec,
    /// `lumen_upstream_first_byte_seconds{provider}`: request sent → response head received.
    pub first_byte: HistogramVec,
    /// `lumen_upstream_errors_total{provider, kind}`: connect, timeout, protocol.
    pub upstream_errors: IntCounterVec,
    /// `lumen_rate_limited_total{key, reason}`: requests refused with 429. `key` is the
    /// configured key id, or `jwt` / `ip` / `anonymous`: JWT subjects and client addresses are
    /// unbounded, and a label per caller would let clients grow the registry.
    pub rate_limited: IntCounterVec,
    /// `lumen_requests_in_flight`: requests being handled now.
    pub in_flight: prometheus::IntGauge,
    /// `lumen_redis_errors_total{op}`: Redis calls that failed or timed out.
    pub redis_errors: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // 100 µs … ~105 s: gateway-answered requests are sub-millisecond, generations are long.
        let buckets = exponential_buckets(0.0001, 2.0, 21).unwrap_or_default();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            // Names and labels are constants: a failure here is a programming error.
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.clone());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let requests = counter(
            "lumen_requests_total",
            "Requests answered, by endpoint, route, provider and status",
            &["endpoint", "route", "provider", "status"],
        );
        let duration = histogram(
            "lumen_request_duration_seconds",
            "Total request time, head to last byte",
            &["endpoint", "route"],
        );
        let first_byte = histogram(
            "lumen_upstream_first_byte_seconds",
            "Time from sending a request upstream to its response head",
            &["provider"],
        );
        let upstream_errors = counter(
            "lumen_upstream_errors_total",
            "Failed upstream attempts, by provider and kind",
            &["provider", "kind"],
        );
        let rate_limited = counter(
            "lumen_rate_limited_total",
            "Requests refused by a rate limit, by key and reason",
            &["key", "reason"],
        );
        let in_flight = prometheus::IntGauge::new(
            "lumen_requests_in_flight",
            "Requests being handled by the proxy now",
        )
        .expect("valid metric");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("unique metric");
        let redis_errors = counter(
            "lumen_redis_errors_total",
            "Redis calls that failed or timed out, by operation",
            &["op"],
        );
        Metrics {
            registry,
            redis_errors,
            requests,
            duration,
            first_byte,
            upstream_errors,
            rate_limited,
            in_flight,
        }
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
