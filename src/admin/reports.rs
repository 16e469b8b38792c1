//! The admin API's answers, as types: the admin app, the `lumen` CLI and the console read
//! them, and `/openapi.json` is generated from them.

use std::sync::atomic::Ordering;

use serde::Serialize;
use utoipa::ToSchema;

use crate::config::reload::ReloadState;
use crate::config::Snapshot;
use crate::ledger::{Counts, Report};
use crate::upstream::health::HealthTable;

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `GET /admin/providers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProvidersReport {
    pub providers: Vec<ProviderReport>,
}

/// What routing knows about one provider now.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderReport {
    pub name: String,
    pub probe: ProbeReport,
    pub in_flight: u64,
    /// Requests it takes at once (`max_in_flight:` or what a sidecar reports); null: no bound.
    pub capacity: Option<u64>,
    pub quota: QuotaReport,
    pub last_error: Option<LastError>,
    /// Per model, as the routes name them.
    pub models: Vec<ModelReport>,
    /// Today's usage (UTC) through this provider.
    pub usage_today: Counts,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProbeReport {
    /// `healthy`, `unhealthy` or `unknown`.
    pub state: &'static str,
    pub enabled: bool,
    pub path: Option<String>,
    pub interval_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QuotaReport {
    /// Left in the provider's quota window; null: no quota.
    pub requests_left: Option<u64>,
    pub tokens_left: Option<u64>,
    /// Set while the quota is spent: milliseconds until it refills.
    pub exhausted_for_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LastError {
    pub message: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelReport {
    pub model: String,
    /// `yes`, or why not: `unhealthy`, `circuit_open`, `rate_limited` or `quota_exhausted`.
    pub available: &'static str,
    pub circuit: CircuitReport,
    /// Moving average of the time to first byte.
    pub latency_ewma_ms: Option<f64>,
    /// Set while the provider's rate limit for this model is being respected.
    pub rate_limited_for_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CircuitReport {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    pub retry_in_ms: u64,
}

/// Per provider: what routing knows about it now, and per model (as routes name them).
pub fn providers(config: &Snapshot, health: &HealthTable, today: &Report) -> ProvidersReport {
    let now = health.now_ms();
    let mut names: Vec<&String> = config.providers.keys().collect();
    names.sort();
    let limit = |v: u64| (v != u64::MAX).then_some(v);
    let providers = names
        .into_iter()
        .map(|name| {
            let p = &config.providers[name];
            let s = health.get(name);
            // Every model a route sends here, even before its first request.
            for route in config.routes.routes() {
                for t in route.targets.iter().filter(|t| &t.provider.name == name) {
                    s.model(&t.health_key);
                }
            }
            let models = s
                .models()
                .into_iter()
                .map(|(model, m)| ModelReport {
                    model,
                    available: s
                        .availability(&m, now, &p.circuit)
                        .err()
                        .map_or("yes", |why| why.label()),
                    circuit: CircuitReport {
                        state: m.circuit.state(now, &p.circuit).label(),
                        retry_in_ms: m.circuit.wait_ms(now, &p.circuit),
                    },
                    latency_ewma_ms: m.latency().map(|d| d.as_secs_f64() * 1000.0),
                    rate_limited_for_ms: m.skipped_ms(now),
                })
                .collect();
            let mut usage_today = Counts::default();
            for (_, c) in today
                .rows
                .iter()
                .filter(|(k, _)| &*k.provider == name.as_str())
            {
                usage_today.add(c);
            }
            ProviderReport {
                name: name.clone(),
                probe: ProbeReport {
                    state: s.probe_state().label(),
                    enabled: p.probe.is_some(),
                    path: p.probe.as_ref().and_then(|pr| pr.path.clone()),
                    interval_ms: p.probe.as_ref().map(|pr| pr.interval.as_millis() as u64),
                },
                in_flight: u64::from(s.in_flight()),
                capacity: s.capacity(p.max_in_flight).map(u64::from),
                quota: QuotaReport {
                    requests_left: limit(s.quota_requests_left.load(Ordering::Relaxed)),
                    tokens_left: limit(s.quota_tokens_left.load(Ordering::Relaxed)),
                    exhausted_for_ms: s.quota_wait_ms(now),
                },
                last_error: s.last_error().map(|(message, at)| LastError {
                    message,
                    at_unix_ms: unix_ms(at),
                }),
                models,
                usage_today,
            }
        })
        .collect();
    ProvidersReport { providers }
}

/// `GET /admin/config`: the active config and the last reload.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigReport {
    pub path: String,
    /// FNV-1a of the file as read, hex.
    pub hash: String,
    pub loaded_at_unix_ms: u64,
    pub routes: u64,
    pub providers: u64,
    pub last_reload: Option<ReloadReport>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadReport {
    pub at_unix_ms: u64,
    /// `sighup` or `file` (a change seen by the watcher).
    pub trigger: &'static str,
    /// `ok` or `error` (the old config kept serving).
    pub result: &'static str,
    /// `file:line:col: message` when it failed, one line per problem.
    pub error: Option<String>,
    /// Every problem the failed file had, one `file:line:col: path: message` each (empty on
    /// success).
    pub problems: Vec<String>,
}

pub fn config(config: &Snapshot, reload: &ReloadState) -> ConfigReport {
    ConfigReport {
        path: config.source.path.clone(),
        hash: config.source.hash.clone(),
        loaded_at_unix_ms: unix_ms(config.source.loaded_at),
        routes: config.routes.routes().count() as u64,
        providers: config.providers.len() as u64,
        last_reload: reload.last().map(|r| ReloadReport {
            at_unix_ms: unix_ms(r.at),
            trigger: r.trigger,
            result: if r.error.is_some() { "error" } else { "ok" },
            problems: r
                .error
                .as_deref()
                .map_or_else(Vec::new, |e| e.lines().map(str::to_string).collect()),
            error: r.error,
        }),
    }
}

/// `GET /admin/routes`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoutesReport {
    pub routes: Vec<RouteReport>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteReport {
    /// The model name (or glob) clients ask for.
    pub model: String,
    /// `priority`, `round_robin`, `weighted`, `least_busy` or `lowest_latency`.
    pub strategy: String,
    pub targets: Vec<TargetReport>,
    pub cache: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TargetReport {
    pub provider: String,
    /// The provider's model name, or `(as asked)` when the client's is passed through.
    pub model: String,
    pub weight: u32,
}

/// Every route: its strategy, targets (provider and model) and whether it caches.
pub fn routes(config: &Snapshot) -> RoutesReport {
    let routes = config
        .routes
        .routes()
        .map(|r| RouteReport {
            model: r.name.clone(),
            strategy: strategy_label(&format!("{:?}", r.strategy)),
            targets: r
                .targets
                .iter()
                .map(|t| TargetReport {
                    provider: t.provider.name.clone(),
                    model: t
                        .model_json
                        .as_ref()
                        .and_then(|m| serde_json::from_slice::<String>(m).ok())
                        .unwrap_or_else(|| "(as asked)".into()),
                    weight: t.weight,
                })
                .collect(),
            cache: r.cache.is_some(),
        })
        .collect();
    RoutesReport { routes }
}

/// `RoundRobin` → `round_robin`, as the config spells it.
fn strategy_label(debug: &str) -> String {
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `GET /admin/usage`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// First and last day (UTC, inclusive).
    pub from: String,
    pub to: String,
    /// `file`, `redis` or `off`.
    pub backend: &'static str,
    /// Set when the store could not be read: rows then hold only what this node has in memory.
    pub store_error: Option<String>,
    pub rows: Vec<UsageRow>,
    pub total: UsageTotal,
}

/// Every row added up.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageTotal {
    #[serde(flatten)]
    pub counts: Counts,
    /// `cost_micros` in USD.
    pub cost_usd: f64,
}

/// One day of one key (and its tenant) at one provider for one model.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRow {
    pub day: String,
    /// The key's id (never the key).
    pub key: String,
    /// The key's tenant; empty when it has none.
    pub tenant: String,
    pub provider: String,
    pub model: String,
    #[serde(flatten)]
    pub counts: Counts,
    /// `cost_micros` in USD, at the prices configured when each request was answered.
    pub cost_usd: f64,
}

/// Micro-dollars as a USD number (six decimals at most: exact as JSON prints it).
fn usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

/// The rows and their total.
pub fn usage(report: &Report, backend: &'static str) -> UsageReport {
    let mut total = Counts::default();
    let rows = report
        .rows
        .iter()
        .map(|(k, c)| {
            total.add(c);
            UsageRow {
                day: k.day.to_string(),
                key: k.key.to_string(),
                tenant: k.tenant.to_string(),
                provider: k.provider.to_string(),
                model: k.model.to_string(),
                counts: *c,
                cost_usd: usd(c.cost_micros),
            }
        })
        .collect();
    UsageReport {
        from: report.from.to_string(),
        to: report.to.to_string(),
        backend,
        store_error: report.store_error.clone(),
        rows,
        total: UsageTotal {
            cost_usd: usd(total.cost_micros),
            counts: total,
        },
    }
}
