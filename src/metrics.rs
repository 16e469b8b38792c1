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
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // 100 µs … ~105 s: gateway-answered requests are sub-millisecond, generations are long.
        let buckets = exponential_buckets(0.0001, 2.0, 21).unwrap_or_default();
        let requests = IntCounterVec::new(
            Opts::new(
                "lumen_requests_total",
                "Requests answered, by endpoint, route, provider and status",
            ),
            &["endpoint", "route", "provider", "status"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "lumen_request_duration_seconds",
                "Total request time, head to last byte",
            )
            .buckets(buckets.clone()),
            &["endpoint", "route"],
        );
        let first_byte = HistogramVec::new(
            HistogramOpts::new(
                "lumen_upstream_first_byte_seconds",
                "Time from sending a request upstream to its response head",
            )
            .buckets(buckets),
            &["provider"],
        );
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "lumen_upstream_errors_total",
                "Failed upstream attempts, by provider and kind",
            ),
            &["provider", "kind"],
        );
        let (requests, duration, first_byte, upstream_errors) =
            match (requests, duration, first_byte, upstream_errors) {
                (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
                // The names and labels above are constants; this cannot fail at run time.
                _ => unreachable!("metric definitions are valid"),
            };
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(first_byte.clone()),
            Box::new(upstream_errors.clone()),
        ] {
            let _ = registry.register(c);
        }
        Metrics {
            registry,
            requests,
            duration,
            first_byte,
            upstream_errors,
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
