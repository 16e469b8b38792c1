//! The admin listener (loopback by default): `/metrics` for Prometheus, and `/admin/providers`
//! (every provider's health, circuit, latency, load, limits and last error).
//!
//! It is a separate Pingora service so that scrapes never share a port, a limit or a failure
//! mode with client traffic.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use arc_swap::ArcSwap;

use crate::config::Snapshot;
use crate::health::HealthTable;
use crate::metrics::Metrics;
use crate::reload::ReloadState;

/// Answers admin requests from shared gateway state.
pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<HealthTable>,
    pub reload: Arc<ReloadState>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, content_type, body) = match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render().into_bytes(),
            ),
            "/metrics/summary" => (StatusCode::OK, "application/json", self.metrics.summary()),
            "/admin/config" => (
                StatusCode::OK,
                "application/json",
                config_report(&self.config.load(), &self.reload),
            ),
            "/admin/providers" => (
                StatusCode::OK,
                "application/json",
                providers_report(&self.config.load(), &self.health),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "application/json",
                lumen_plugins::error_body(
                    "unknown admin endpoint",
                    "invalid_request_error",
                    "unknown_url",
                ),
            ),
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

/// Per provider: what routing knows about it now, and per model (as routes name them).
fn providers_report(config: &Snapshot, health: &HealthTable) -> Vec<u8> {
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
