//! Prometheus metrics, in one registry that every part of the gateway registers into.
//!
//! Labels are bounded: route names come from the config (never the client's raw model string),
//! providers from the config, statuses from a fixed set, endpoints from a fixed set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::openai::Endpoint;
use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
    /// `lumen_redis_errors_total{op}`: Redis calls that failed or timed out (counted by the
    /// Redis link for every call, through [`RedisObserver`]).
    pub redis_errors: IntCounterVec,
    /// `lumen_redis_latency_seconds{op}`: every Redis call's time, failed ones included.
    pub redis_latency: HistogramVec,
    /// `lumen_otel_spans_total{result}`: ended spans `exported`, `failed` (the collector
    /// refused them or was down) or `dropped` (the export queue was full).
    pub otel_spans: IntCounterVec,
    /// Both of the above resolved once for each operation the gateway names.
    redis_ops: Vec<(&'static str, prometheus::Histogram, prometheus::IntCounter)>,
    /// `lumen_upstream_attempts_total{provider, outcome}`: every attempt and how it ended
    /// (`ok`, `connect`, `timeout`, `dropped`, `status_429`, `status_5xx`, `status_4xx`).
    pub attempts: IntCounterVec,
    /// `lumen_retries_total{route, reason}`: attempts after the first, by the failure before.
    pub retries: IntCounterVec,
    /// `lumen_fallbacks_total{route, from, to}`: a request moved to another provider.
    pub fallbacks: IntCounterVec,
    /// `lumen_no_target_total{route}`: requests refused because no target was available.
    pub no_target: IntCounterVec,
    /// `lumen_circuit_state{provider, model}`: 0 closed, 1 half-open, 2 open (models come
    /// from the routing table, or from clients only through `expose_models` providers).
    pub circuit_state: IntGaugeVec,
    /// `lumen_provider_healthy{provider}`: the active probes' verdict (1 healthy, 0 not).
    pub provider_healthy: IntGaugeVec,
    /// `lumen_probes_total{provider, result}`.
    pub probes: IntCounterVec,
    /// `lumen_upstream_duration_seconds{provider}`: request sent → last byte received.
    pub upstream_duration: HistogramVec,
    /// `lumen_cache_requests_total{route, result}`: `hit`, `miss`, `bypass`, `coalesced`.
    pub cache: IntCounterVec,
    /// `lumen_gateway_overhead_seconds{endpoint}`: time in Lumen, waiting on providers excluded.
    pub overhead: HistogramVec,
    /// `lumen_tokens_total{key, provider, route, kind}`: tokens providers reported, `kind`
    /// `prompt` or `completion` (route names are the client-facing model names).
    pub tokens: IntCounterVec,
    /// `lumen_cost_usd_total{key, provider, route}`: what answered requests cost, in USD, at
    /// the configured prices (`key` as for `rate_limited`).
    pub cost: prometheus::CounterVec,
    /// `lumen_budget_used_ratio{scope, name}`: the share of a configured key's or tenant's
    /// dollar budget spent in its current window (the tighter of day and month).
    pub budget_used: prometheus::GaugeVec,
    /// `lumen_budget_alert_ratio{scope, name}`: the budget's `alert_at` (the shipped alert
    /// fires when `used` reaches it).
    pub budget_alert: prometheus::GaugeVec,
    /// `lumen_config_reloads_total{result}`: `ok` or `error`.
    pub reloads: IntCounterVec,
    /// `lumen_config_last_reload_success_timestamp_seconds`.
    pub last_reload: prometheus::IntGauge,
    /// `lumen_time_to_first_token_seconds{endpoint, route}`: request head → first streamed
    /// chunk sent to the client (streams only).
    pub ttft: HistogramVec,
    /// `lumen_sidecar_up{provider}`: a `spawn:` sidecar's process is running (1) or not (0).
    pub sidecar_up: IntGaugeVec,
    /// `lumen_sidecar_restarts_total{provider}`: times the supervisor restarted it.
    pub sidecar_restarts: IntCounterVec,
    /// `lumen_provider_in_flight{provider}` and `lumen_provider_slots{provider}` (configured
    /// `max_in_flight`, or the slots a sidecar reports): set at each scrape.
    pub provider_in_flight: IntGaugeVec,
    pub provider_slots: IntGaugeVec,
    /// `lumen_connections_open{thread}`: client connections each proxy thread serves, in
    /// `server.runtime: per_core` (whose threads spread connections evenly, `spread.rs`).
    pub connections_open: IntGaugeVec,
    /// `lumen_usage_flushes_total{result}`: usage ledger writes, `ok` or `error`.
    pub usage_flushes: IntCounterVec,
    /// `lumen_jobs_queued`: async jobs waiting for a worker.
    pub jobs_queued: prometheus::IntGauge,
    /// `lumen_jobs_total{outcome}`: jobs that ended (`completed`, `failed`, `cancelled`).
    pub jobs: IntCounterVec,
    /// `lumen_hedges_total{route, outcome}`: hedges `won` (the hedge answered first), `lost`
    /// (the first target did), `skipped_budget` (due, but over the route's hedge budget).
    pub hedges: IntCounterVec,
    /// `lumen_batches_total{status}`: batches that ended (`completed`, `failed`, `expired`,
    /// `cancelled`), counted by the node that finalized them.
    pub batches: IntCounterVec,
    /// `lumen_batch_requests_total{outcome}`: batch lines recorded (`completed`, `failed`).
    pub batch_requests: IntCounterVec,
    /// `lumen_job_queue_wait_seconds` and `lumen_job_run_seconds`.
    pub job_queue_wait: prometheus::Histogram,
    pub job_run: prometheus::Histogram,
    /// `overhead` by endpoint, resolved on first use.
    overhead_by_endpoint: [OnceLock<prometheus::Histogram>; Endpoint::COUNT],
    /// Tells this registry from another one (see [`Series`]).
    id: usize,
}

/// A series (or a few) resolved once and kept beside what it labels (a route, a provider), so
/// a request records into it without looking it up by label values: each lookup hashes the
/// values, takes the metric's read lock (shared by every thread) and clones and drops an `Arc`.
/// It is kept with the registry it came from: one route or provider seen by a second registry
/// (two gateways on one config) has its series looked up each time there, as before.
pub struct Series<T> {
    cell: OnceLock<(usize, T)>,
}

impl<T> Default for Series<T> {
    fn default() -> Series<T> {
        Series {
            cell: OnceLock::new(),
        }
    }
}

impl<T> std::fmt::Debug for Series<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Series")
    }
}

impl<T: Clone> Series<T> {
    /// The series in `metrics`, made by `make` the first time.
    pub fn get(&self, metrics: &Metrics, make: impl Fn(&Metrics) -> T) -> Cow<'_, T> {
        let (owner, series) = self.cell.get_or_init(|| (metrics.id, make(metrics)));
        if *owner == metrics.id {
            Cow::Borrowed(series)
        } else {
            Cow::Owned(make(metrics))
        }
    }
}

/// What every forwarded attempt records for its provider.
#[derive(Clone)]
pub struct ProviderSeries {
    pub first_byte: prometheus::Histogram,
    pub upstream_duration: prometheus::Histogram,
    /// `attempts{provider, outcome="ok"}` (other outcomes are rarer and looked up).
    pub attempts_ok: prometheus::IntCounter,
}

/// What every request on a route records, one slot per endpoint.
#[derive(Debug, Default)]
pub struct RouteSeries {
    duration: [Series<prometheus::Histogram>; Endpoint::COUNT],
    ttft: [Series<prometheus::Histogram>; Endpoint::COUNT],
    /// `requests{endpoint, route, provider, status}` of the first answer seen with each
    /// endpoint: nearly every request of a route repeats it (its provider, a 200).
    requests: [Series<(String, u16, prometheus::IntCounter)>; Endpoint::COUNT],
}

impl RouteSeries {
    /// Counts a finished request in `lumen_requests_total{endpoint, route, provider, status}`:
    /// through the kept series when it has the same provider and status, else by lookup.
    pub fn count_request(
        &self,
        metrics: &Metrics,
        endpoint: Endpoint,
        route: &str,
        (provider, code, status): (&str, u16, &str),
    ) {
        let kept = self.requests[endpoint.index()].get(metrics, |m| {
            let counter =
                m.requests
                    .with_label_values(&[endpoint.label(), route, provider, status]);
            (provider.to_string(), code, counter)
        });
        if kept.0 == provider && kept.1 == code {
            kept.2.inc();
        } else {
            metrics
                .requests
                .with_label_values(&[endpoint.label(), route, provider, status])
                .inc();
        }
    }

    /// `lumen_request_duration_seconds{endpoint, route}`.
    pub fn duration<'a>(
        &'a self,
        metrics: &Metrics,
        endpoint: Endpoint,
        route: &str,
    ) -> Cow<'a, prometheus::Histogram> {
        by_endpoint(&self.duration, metrics, |m| &m.duration, endpoint, route)
    }

    /// `lumen_time_to_first_token_seconds{endpoint, route}`.
    pub fn ttft<'a>(
        &'a self,
        metrics: &Metrics,
        endpoint: Endpoint,
        route: &str,
    ) -> Cow<'a, prometheus::Histogram> {
        by_endpoint(&self.ttft, metrics, |m| &m.ttft, endpoint, route)
    }
}

/// The `{endpoint, route}` series of `vec` kept in `slots`.
fn by_endpoint<'a>(
    slots: &'a [Series<prometheus::Histogram>; Endpoint::COUNT],
    metrics: &Metrics,
    vec: fn(&Metrics) -> &HistogramVec,
    endpoint: Endpoint,
    route: &str,
) -> Cow<'a, prometheus::Histogram> {
    slots[endpoint.index()].get(metrics, |m| {
        vec(m).with_label_values(&[endpoint.label(), route])
    })
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
        let cost = prometheus::CounterVec::new(
            Opts::new(
                "lumen_cost_usd_total",
                "What answered requests cost at the configured prices, in USD, by key, provider and route",
            ),
            &["key", "provider", "route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(cost.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), &["scope", "name"])
                .expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let budget_used = gauge(
            "lumen_budget_used_ratio",
            "Share of a key's or tenant's dollar budget spent in its current window",
        );
        let budget_alert = gauge(
            "lumen_budget_alert_ratio",
            "The share of a dollar budget at which its alert fires (alert_at)",
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
        let otel_spans = counter(
            "lumen_otel_spans_total",
            "Trace spans exported, failed to export, or dropped (export queue full)",
            &["result"],
        );
        let redis_errors = counter(
            "lumen_redis_errors_total",
            "Redis calls that failed or timed out, by operation",
            &["op"],
        );
        let redis_latency = {
            // 50 µs … ~1.6 s: a call on loopback is well under a millisecond; the top buckets
            // catch timeouts and failovers.
            let buckets = exponential_buckets(0.00005, 2.0, 16).unwrap_or_default();
            let opts = HistogramOpts::new(
                "lumen_redis_latency_seconds",
                "Time of each Redis call, by operation",
            )
            .buckets(buckets);
            let h = HistogramVec::new(opts, &["op"]).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let redis_ops = REDIS_OPS
            .iter()
            .map(|op| {
                (
                    *op,
                    redis_latency.with_label_values(&[op]),
                    redis_errors.with_label_values(&[op]),
                )
            })
            .collect();
        let attempts = counter(
            "lumen_upstream_attempts_total",
            "Upstream attempts, by provider and outcome",
            &["provider", "outcome"],
        );
        let retries = counter(
            "lumen_retries_total",
            "Attempts after the first, by route and the failure that caused them",
            &["route", "reason"],
        );
        let fallbacks = counter(
            "lumen_fallbacks_total",
            "Requests moved from one provider to another, by route",
            &["route", "from", "to"],
        );
        let no_target = counter(
            "lumen_no_target_total",
            "Requests refused because no target of the route was available",
            &["route"],
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let circuit_state = gauge(
            "lumen_circuit_state",
            "Circuit breaker per provider model: 0 closed, 1 half-open, 2 open",
            &["provider", "model"],
        );
        let provider_healthy = gauge(
            "lumen_provider_healthy",
            "Active health probes' verdict per provider: 1 healthy, 0 unhealthy",
            &["provider"],
        );
        let probes = counter(
            "lumen_probes_total",
            "Active health probes, by provider and result",
            &["provider", "result"],
        );
        let upstream_duration = histogram(
            "lumen_upstream_duration_seconds",
            "Time from sending a request upstream to its last byte",
            &["provider"],
        );
        let cache = counter(
            "lumen_cache_requests_total",
            "Requests on cached routes, by route and result",
            &["route", "result"],
        );
        // 10 µs … ~10 s: the gateway's own time is usually well under a millisecond.
        let overhead = {
            let opts = HistogramOpts::new(
                "lumen_gateway_overhead_seconds",
                "Time spent in the gateway per request, waiting on providers excluded",
            )
            .buckets(exponential_buckets(0.00001, 2.0, 20).unwrap_or_default());
            let h = HistogramVec::new(opts, &["endpoint"]).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let tokens = counter(
            "lumen_tokens_total",
            "Tokens providers reported, by key, provider, route and kind (prompt, completion)",
            &["key", "provider", "route", "kind"],
        );
        let reloads = counter(
            "lumen_config_reloads_total",
            "Config reloads, by result (ok, error)",
            &["result"],
        );
        let last_reload = prometheus::IntGauge::new(
            "lumen_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config reload (0: none since start)",
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_reload.clone()))
            .expect("unique metric");
        let ttft = histogram(
            "lumen_time_to_first_token_seconds",
            "Streams: time from the request head to the first chunk sent to the client",
            &["endpoint", "route"],
        );
        let sidecar_up = gauge(
            "lumen_sidecar_up",
            "Whether a spawned lumen-llama sidecar's process is running (1) or not (0)",
            &["provider"],
        );
        let sidecar_restarts = counter(
            "lumen_sidecar_restarts_total",
            "Times a spawned sidecar was restarted after it exited",
            &["provider"],
        );
        let provider_in_flight = gauge(
            "lumen_provider_in_flight",
            "Requests in flight to a provider",
            &["provider"],
        );
        let provider_slots = gauge(
            "lumen_provider_slots",
            "Requests a provider takes at once (max_in_flight or a sidecar's reported slots; 0: unbounded)",
            &["provider"],
        );
        let connections_open = gauge(
            "lumen_connections_open",
            "Client connections open on each proxy thread (server.runtime: per_core)",
            &["thread"],
        );
        let usage_flushes = counter(
            "lumen_usage_flushes_total",
            "Usage ledger writes to its file or Redis, by result",
            &["result"],
        );
        let jobs_queued =
            prometheus::IntGauge::new("lumen_jobs_queued", "Async jobs waiting for a worker")
                .expect("valid metric");
        registry
            .register(Box::new(jobs_queued.clone()))
            .expect("unique metric");
        let jobs = counter(
            "lumen_jobs_total",
            "Async jobs that ended, by outcome (completed, failed, cancelled)",
            &["outcome"],
        );
        let hedges = counter(
            "lumen_hedges_total",
            "Hedged requests by route and outcome (won, lost, skipped_budget)",
            &["route", "outcome"],
        );
        let batches = counter(
            "lumen_batches_total",
            "Batches that ended, by status (completed, failed, expired, cancelled)",
            &["status"],
        );
        let batch_requests = counter(
            "lumen_batch_requests_total",
            "Batch lines whose outcome was recorded, by outcome (completed, failed)",
            &["outcome"],
        );
        let plain_histogram = |name: &str, help: &str| {
            let h = prometheus::Histogram::with_opts(
                HistogramOpts::new(name, help).buckets(buckets.clone()),
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let job_queue_wait = plain_histogram(
            "lumen_job_queue_wait_seconds",
            "Time async jobs waited in the queue before a worker took them",
        );
        let job_run = plain_histogram(
            "lumen_job_run_seconds",
            "Time workers spent running async jobs",
        );
        for outcome in ["completed", "failed", "cancelled"] {
            jobs.with_label_values(&[outcome]);
        }
        // Known outcomes start at 0, so a dashboard's rate() sees the first one.
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
            usage_flushes.with_label_values(&[result]);
        }
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Metrics {
            overhead_by_endpoint: Default::default(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            jobs_queued,
            jobs,
            hedges,
            batches,
            batch_requests,
            job_queue_wait,
            job_run,
            ttft,
            sidecar_up,
            sidecar_restarts,
            provider_in_flight,
            provider_slots,
            connections_open,
            usage_flushes,
            overhead,
            tokens,
            cost,
            budget_used,
            budget_alert,
            reloads,
            last_reload,
            cache,
            attempts,
            retries,
            fallbacks,
            no_target,
            circuit_state,
            provider_healthy,
            probes,
            upstream_duration,
            redis_errors,
            redis_latency,
            otel_spans,
            redis_ops,
            requests,
            duration,
            first_byte,
            upstream_errors,
            rate_limited,
            in_flight,
        }
    }

    /// The Prometheus text exposition of every registered metric.
    /// `lumen_gateway_overhead_seconds{endpoint}`.
    pub fn overhead_for(&self, endpoint: Endpoint) -> &prometheus::Histogram {
        self.overhead_by_endpoint[endpoint.index()]
            .get_or_init(|| self.overhead.with_label_values(&[endpoint.label()]))
    }

    /// A provider's per-attempt series, for [`Series`].
    pub fn provider_series(&self, provider: &str) -> ProviderSeries {
        ProviderSeries {
            first_byte: self.first_byte.with_label_values(&[provider]),
            upstream_duration: self.upstream_duration.with_label_values(&[provider]),
            attempts_ok: self.attempts.with_label_values(&[provider, "ok"]),
        }
    }

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

/// Sum of a counter family, optionally grouped by one label (`"total"` without one).
pub(crate) fn sum_by(
    families: &[prometheus::proto::MetricFamily],
    name: &str,
    label: Option<&str>,
) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for family in families.iter().filter(|f| f.name() == name) {
        for m in family.get_metric() {
            let value = m.get_counter().get_value() as u64;
            let key = match label {
                None => "total".to_string(),
                Some(label) => m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == label)
                    .map_or_else(String::new, |l| l.value().to_string()),
            };
            *out.entry(key).or_default() += value;
        }
    }
    out
}

/// A histogram family with every label set merged: (upper bound in seconds, cumulative count),
/// ascending, ending with `+Inf` (every observation). Just `[(+Inf, 0)]` before the first one.
pub(crate) fn merged_histogram(
    families: &[prometheus::proto::MetricFamily],
    name: &str,
) -> Vec<(f64, u64)> {
    let mut merged: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    let mut count = 0;
    for family in families.iter().filter(|f| f.name() == name) {
        for m in family.get_metric() {
            let h = m.get_histogram();
            count += h.get_sample_count();
            for b in h.get_bucket() {
                let bound = b.upper_bound();
                // Positive bounds order the same as their bit patterns.
                merged.entry(bound.to_bits()).or_insert((bound, 0)).1 += b.cumulative_count();
            }
        }
    }
    let mut all: Vec<(f64, u64)> = merged.into_values().collect();
    if all.last().is_none_or(|(bound, _)| bound.is_finite()) {
        all.push((f64::INFINITY, count));
    }
    all
}

/// Estimated quantile (seconds) of a histogram family, all label sets merged: the upper bound
/// of the bucket the quantile falls in (none above the last finite bound).
fn quantile(families: &[prometheus::proto::MetricFamily], name: &str, q: f64) -> Option<f64> {
    let buckets = merged_histogram(families, name);
    let count = buckets.last()?.1;
    if count == 0 {
        return None;
    }
    let want = (count as f64 * q).ceil() as u64;
    buckets
        .into_iter()
        .filter(|(bound, _)| bound.is_finite())
        .find(|(_, c)| *c >= want)
        .map(|(bound, _)| bound)
}

/// `GET /metrics/summary`: the essentials of `/metrics` as compact JSON for humans. Counts
/// since the process started; quantiles are the upper bound of the bucket they fall in.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub requests: RequestSummary,
    pub latency_ms: Quantiles,
    pub time_to_first_token_ms: Quantiles,
    pub gateway_overhead_us: Quantiles,
    /// By kind (`prompt`, `completion`).
    pub tokens: BTreeMap<String, u64>,
    /// By result (`hit`, `miss`, `coalesced`, `bypass`).
    pub cache: BTreeMap<String, u64>,
    /// By reason.
    pub rate_limited: BTreeMap<String, u64>,
    pub upstream: UpstreamSummary,
    /// By result (`ok`, `error`).
    pub config_reloads: BTreeMap<String, u64>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RequestSummary {
    pub total: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_route: BTreeMap<String, u64>,
    pub in_flight: i64,
}

/// Absent (null) before the first observation.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UpstreamSummary {
    /// By outcome.
    pub attempts: BTreeMap<String, u64>,
    pub retries: u64,
    pub fallbacks: u64,
}

impl Metrics {
    /// `/metrics/summary`.
    pub fn summary(&self) -> Summary {
        let f = self.registry.gather();
        let total = |name: &str| sum_by(&f, name, None).get("total").copied().unwrap_or(0);
        let ms = |name: &str| Quantiles {
            p50: quantile(&f, name, 0.5).map(|s| (s * 1000.0 * 1000.0).round() / 1000.0),
            p99: quantile(&f, name, 0.99).map(|s| (s * 1000.0 * 1000.0).round() / 1000.0),
        };
        let us = |name: &str| Quantiles {
            p50: quantile(&f, name, 0.5).map(|s| (s * 1e6).round()),
            p99: quantile(&f, name, 0.99).map(|s| (s * 1e6).round()),
        };
        Summary {
            requests: RequestSummary {
                total: total("lumen_requests_total"),
                by_status: sum_by(&f, "lumen_requests_total", Some("status")),
                by_route: sum_by(&f, "lumen_requests_total", Some("route")),
                in_flight: self.in_flight.get(),
            },
            latency_ms: ms("lumen_request_duration_seconds"),
            time_to_first_token_ms: ms("lumen_time_to_first_token_seconds"),
            gateway_overhead_us: us("lumen_gateway_overhead_seconds"),
            tokens: sum_by(&f, "lumen_tokens_total", Some("kind")),
            cache: sum_by(&f, "lumen_cache_requests_total", Some("result")),
            rate_limited: sum_by(&f, "lumen_rate_limited_total", Some("reason")),
            upstream: UpstreamSummary {
                attempts: sum_by(&f, "lumen_upstream_attempts_total", Some("outcome")),
                retries: total("lumen_retries_total"),
                fallbacks: total("lumen_fallbacks_total"),
            },
            config_reloads: sum_by(&f, "lumen_config_reloads_total", Some("result")),
        }
    }
}

/// The operations Redis calls are made for (`op` of the Redis metrics).
pub const REDIS_OPS: [&str; 9] = [
    "rate_limit",
    "budget",
    "cache",
    "jobs",
    "ledger",
    "responses",
    "batches",
    "files",
    "topology",
];

impl lumen_plugins::redis_link::RedisObserver for Metrics {
    fn call(&self, op: &'static str, elapsed: std::time::Duration, failed: bool) {
        crate::telemetry::spans::redis_call(op, elapsed, failed);
        let seconds = elapsed.as_secs_f64();
        match self.redis_ops.iter().find(|(name, _, _)| *name == op) {
            Some((_, latency, errors)) => {
                latency.observe(seconds);
                if failed {
                    errors.inc();
                }
            }
            None => {
                self.redis_latency.with_label_values(&[op]).observe(seconds);
                if failed {
                    self.redis_errors.with_label_values(&[op]).inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
        metrics
            .registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_histogram().get_sample_count())
            .sum()
    }

    /// A route's series lands in the registry that records it, also when one route is seen by
    /// two registries (the second one's series is looked up, not the first one's reused).
    #[test]
    fn kept_series_record_into_their_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let route = RouteSeries::default();
        let labels = [("endpoint", "chat"), ("route", "r")];
        let name = "lumen_request_duration_seconds";
        route
            .duration(&a, Endpoint::ChatCompletions, "r")
            .observe(0.1);
        route
            .duration(&a, Endpoint::ChatCompletions, "r")
            .observe(0.1);
        route
            .duration(&b, Endpoint::ChatCompletions, "r")
            .observe(0.1);
        assert_eq!(count(&a, name, &labels), 2);
        assert_eq!(count(&b, name, &labels), 1);
        // Each endpoint has its own slot.
        route.duration(&a, Endpoint::Embeddings, "r").observe(0.1);
        assert_eq!(count(&a, name, &labels), 2);
        assert_eq!(count(&a, name, &[("endpoint", "embeddings")]), 1);
        a.overhead_for(Endpoint::Rerank).observe(0.1);
        let overhead = "lumen_gateway_overhead_seconds";
        assert_eq!(count(&a, overhead, &[("endpoint", "rerank")]), 1);
        assert_eq!(count(&a, overhead, &[("endpoint", "chat")]), 0);
    }

    #[test]
    fn endpoint_indexes_are_dense() {
        let all = Endpoint::ALL;
        // `ALL` lists them in index order.
        assert!(all.iter().enumerate().all(|(i, e)| e.index() == i));
        let mut seen: Vec<usize> = all.iter().map(|e| e.index()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..Endpoint::COUNT).collect::<Vec<_>>());
    }
}
