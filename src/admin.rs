//! The admin listener (loopback by default): `/metrics` for Prometheus, `/metrics/summary`,
//! `/admin/providers` (every provider's health, circuit, latency, load, limits, last error and
//! today's usage), `/admin/config` (the active config and the last reload) and `/admin/usage`
//! (the usage ledger, filtered).
//!
//! It is a separate Pingora service so that scrapes never share a port, a limit or a failure
//! mode with client traffic. With `admin_key:` set every request must present it (config
//! validation requires one when the listener is not on loopback); the key is read from the live
//! snapshot, so rotating it is a reload.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use arc_swap::ArcSwap;

use crate::config::Snapshot;
use crate::health::HealthTable;
use crate::ledger::{Day, Filter, Ledger, Report, MAX_QUERY_DAYS};
use crate::metrics::Metrics;
use crate::reload::ReloadState;

/// Answers admin requests from shared gateway state.
pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<HealthTable>,
    pub reload: Arc<ReloadState>,
    pub ledger: Arc<Ledger>,
}

fn json_error(status: StatusCode, message: &str, kind: &str, code: &str) -> Reply {
    (
        status,
        "application/json",
        lumen_plugins::error_body(message, kind, code),
    )
}

type Reply = (StatusCode, &'static str, Vec<u8>);

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let head = session.req_header();
        let path = head.uri.path().to_string();
        let query = head.uri.query().unwrap_or("").to_string();
        let config = self.config.load_full();
        let allowed = config
            .admin_key
            .as_ref()
            .is_none_or(|key| key.admits(&head.headers));
        let (status, content_type, body) = if !allowed {
            json_error(
                StatusCode::UNAUTHORIZED,
                "the admin listener needs the admin key (Authorization: Bearer <admin_key>)",
                "invalid_request_error",
                "invalid_api_key",
            )
        } else if head.method != http::Method::GET && head.method != http::Method::HEAD {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "the admin API is read-only: use GET",
                "invalid_request_error",
                "method_not_allowed",
            )
        } else {
            match path.as_str() {
                "/metrics" => {
                    self.collect_provider_load(&config);
                    (
                        StatusCode::OK,
                        "text/plain; version=0.0.4",
                        self.metrics.render().into_bytes(),
                    )
                }
                "/metrics/summary" => (StatusCode::OK, "application/json", self.metrics.summary()),
                "/admin/config" => (
                    StatusCode::OK,
                    "application/json",
                    config_report(&config, &self.reload),
                ),
                "/admin/providers" => {
                    let today = self.ledger.query(&Filter::default()).await;
                    (
                        StatusCode::OK,
                        "application/json",
                        providers_report(&config, &self.health, &today),
                    )
                }
                "/admin/routes" => (StatusCode::OK, "application/json", routes_report(&config)),
                "/admin/usage" => match parse_filter(&query) {
                    Ok(filter) => {
                        let report = self.ledger.query(&filter).await;
                        (
                            StatusCode::OK,
                            "application/json",
                            usage_report(&report, self.ledger.backend()),
                        )
                    }
                    Err(message) => json_error(
                        StatusCode::BAD_REQUEST,
                        &message,
                        "invalid_request_error",
                        "invalid_parameter",
                    ),
                },
                _ => json_error(
                    StatusCode::NOT_FOUND,
                    "unknown admin endpoint",
                    "invalid_request_error",
                    "unknown_url",
                ),
            }
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

impl AdminApp {
    /// Gauges read off the health table at scrape time rather than kept up to date per request.
    fn collect_provider_load(&self, config: &Snapshot) {
        for (name, p) in &config.providers {
            let s = self.health.get(name);
            self.metrics
                .provider_in_flight
                .with_label_values(&[name])
                .set(i64::from(s.in_flight()));
            self.metrics
                .provider_slots
                .with_label_values(&[name])
                .set(i64::from(s.capacity(p.max_in_flight).unwrap_or(0)));
        }
    }
}

/// Per provider: what routing knows about it now, and per model (as routes name them).
fn providers_report(config: &Snapshot, health: &HealthTable, today: &Report) -> Vec<u8> {
    let now = health.now_ms();
    let mut names: Vec<&String> = config.providers.keys().collect();
    names.sort();
    let limit = |v: u64| (v != u64::MAX).then_some(v);
    let providers: Vec<serde_json::Value> = names
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
            let models: Vec<serde_json::Value> = s
                .models()
                .into_iter()
                .map(|(model, m)| {
                    serde_json::json!({
                        "model": model,
                        "available": s.availability(&m, now, &p.circuit).err().map_or("yes", |why| why.label()),
                        "circuit": {
                            "state": m.circuit.state(now, &p.circuit).label(),
                            "retry_in_ms": m.circuit.wait_ms(now, &p.circuit),
                        },
                        "latency_ewma_ms": m.latency().map(|d| d.as_secs_f64() * 1000.0),
                        "rate_limited_for_ms": m.skipped_ms(now),
                    })
                })
                .collect();
            let mut usage_today = crate::ledger::Counts::default();
            for (_, c) in today.rows.iter().filter(|(k, _)| &*k.provider == name.as_str()) {
                usage_today.add(c);
            }
            serde_json::json!({
                "name": name,
                "probe": {
                    "state": s.probe_state().label(),
                    "enabled": p.probe.is_some(),
                    "path": p.probe.as_ref().and_then(|pr| pr.path.clone()),
                    "interval_ms": p.probe.as_ref().map(|pr| pr.interval.as_millis() as u64),
                },
                "in_flight": s.in_flight(),
                "capacity": s.capacity(p.max_in_flight),
                "quota": {
                    "requests_left": limit(s.quota_requests_left.load(std::sync::atomic::Ordering::Relaxed)),
                    "tokens_left": limit(s.quota_tokens_left.load(std::sync::atomic::Ordering::Relaxed)),
                    "exhausted_for_ms": s.quota_wait_ms(now),
                },
                "last_error": s.last_error().map(|(message, at)| serde_json::json!({
                    "message": message,
                    "at_unix_ms": at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                })),
                "models": models,
                "usage_today": usage_today,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "providers": providers })).unwrap_or_default()
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The active config and the last reload's outcome.
fn config_report(config: &Snapshot, reload: &ReloadState) -> Vec<u8> {
    let last = reload.last().map(|r| {
        serde_json::json!({
            "at_unix_ms": unix_ms(r.at),
            "trigger": r.trigger,
            "result": if r.error.is_some() { "error" } else { "ok" },
            "error": r.error,
        })
    });
    serde_json::to_vec(&serde_json::json!({
        "path": config.source.path,
        "hash": config.source.hash,
        "loaded_at_unix_ms": unix_ms(config.source.loaded_at),
        "routes": config.routes.routes().count(),
        "providers": config.providers.len(),
        "last_reload": last,
    }))
    .unwrap_or_default()
}

/// Every route: its strategy, targets (provider and model) and whether it caches.
fn routes_report(config: &Snapshot) -> Vec<u8> {
    let routes: Vec<serde_json::Value> = config
        .routes
        .routes()
        .map(|r| {
            let targets: Vec<serde_json::Value> = r
                .targets
                .iter()
                .map(|t| {
                    let model = t
                        .model_json
                        .as_ref()
                        .and_then(|m| serde_json::from_slice::<String>(m).ok());
                    serde_json::json!({
                        "provider": t.provider.name,
                        "model": model.unwrap_or_else(|| "(as asked)".into()),
                        "weight": t.weight,
                    })
                })
                .collect();
            serde_json::json!({
                "model": r.name,
                "strategy": strategy_label(&format!("{:?}", r.strategy)),
                "targets": targets,
                "cache": r.cache.is_some(),
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "routes": routes })).unwrap_or_default()
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

/// `/admin/usage?key=&provider=&model=&from=YYYY-MM-DD&to=YYYY-MM-DD` (days inclusive, UTC;
/// both default to today, `from` to `to`).
fn parse_filter(query: &str) -> Result<Filter, String> {
    let mut filter = Filter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)
            .ok_or_else(|| format!("`{name}` is not valid percent-encoded UTF-8"))?;
        let day = |v: &str| {
            Day::parse(v)
                .ok_or_else(|| format!("`{name}` must be a date such as 2026-11-23, got `{v}`"))
        };
        match name {
            "key" => filter.key = Some(value),
            "provider" => filter.provider = Some(value),
            "model" => filter.model = Some(value),
            "from" => filter.from = Some(day(&value)?),
            "to" => filter.to = Some(day(&value)?),
            other => {
                return Err(format!(
                    "unknown parameter `{other}` (filters: key, provider, model, from, to)"
                ))
            }
        }
    }
    let to = filter.to.unwrap_or_else(Day::today);
    let from = filter.from.unwrap_or(to);
    if from > to {
        return Err(format!("`from` ({from}) is after `to` ({to})"));
    }
    if from.span(to) > i64::from(MAX_QUERY_DAYS) {
        return Err(format!("at most {MAX_QUERY_DAYS} days per query"));
    }
    filter.to = Some(to);
    filter.from = Some(from);
    Ok(filter)
}

/// `%XX` and `+` decoding of a query value.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = value.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The rows and their total.
fn usage_report(report: &Report, backend: &str) -> Vec<u8> {
    let mut total = crate::ledger::Counts::default();
    let rows: Vec<serde_json::Value> = report
        .rows
        .iter()
        .map(|(k, c)| {
            total.add(c);
            let mut row = serde_json::json!({
                "day": k.day.to_string(),
                "key": &*k.key,
                "provider": &*k.provider,
                "model": &*k.model,
            });
            if let (Some(obj), Ok(serde_json::Value::Object(counts))) =
                (row.as_object_mut(), serde_json::to_value(c))
            {
                obj.extend(counts);
            }
            row
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "from": report.from.to_string(),
        "to": report.to.to_string(),
        "backend": backend,
        "store_error": report.store_error,
        "rows": rows,
        "total": total,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_usage_filters_and_refuses_bad_ones() {
        let f = parse_filter("key=team%20a&provider=openai&from=2026-11-01&to=2026-11-23").unwrap();
        assert_eq!(f.key.as_deref(), Some("team a"));
        assert_eq!(f.provider.as_deref(), Some("openai"));
        assert_eq!(f.from.unwrap().to_string(), "2026-11-01");
        let today = parse_filter("").unwrap();
        assert_eq!(today.from, today.to);
        for bad in [
            "from=2026-13-01",
            "from=2026-11-24&to=2026-11-23",
            "from=2020-01-01&to=2026-01-01",
            "colour=red",
            "key=%zz",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
