//! The admin listener (loopback by default):
//!
//! - for machines: `/metrics` (Prometheus), `/metrics/summary`, `/admin/providers` (every
//!   provider's health, circuit, latency, load, limits, last error and today's usage),
//!   `/admin/config` (the active config and the last reload), `/admin/routes`, `/admin/usage`
//!   (the usage ledger, filtered), `/admin/budgets` (dollar budgets), `/admin/timeseries` (the last 15 minutes of traffic) and
//!   `/openapi.json`;
//! - for people: `/ui` (the console), `/docs` (Swagger UI) and `/redoc` (ReDoc), whose
//!   front-end packages are read from disk ([`assets`]), never from a CDN.
//!
//! It is a separate Pingora service so that scrapes never share a port, a limit or a failure
//! mode with client traffic. With `admin_key:` set every request must present it (config
//! validation requires one when the listener is not on loopback); the key is read from the live
//! snapshot, so rotating it is a reload. Browsers present it as a Basic password, which they
//! ask for themselves.
//!
//! Imports: `config`, `upstream::health`, `ledger`, `metrics`, `jobs` and `ops` (read-only, for
//! reports and the OpenAPI document); never `proxy` or `node`.

mod assets;
pub mod budgets;
pub mod cli;
mod history;
pub mod openapi;
mod reply;
pub mod reports;
mod ui;

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use arc_swap::ArcSwap;

pub use history::{History, Sampler, Timeseries};

use crate::config::reload::ReloadState;
use crate::config::Snapshot;
use crate::ledger::{Day, Filter, Ledger, MAX_QUERY_DAYS};
use crate::metrics::Metrics;
use crate::upstream::health::HealthTable;
use reply::Reply;

/// Answers admin requests from shared gateway state.
pub struct AdminApp {
    pub metrics: Arc<Metrics>,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub health: Arc<HealthTable>,
    pub reload: Arc<ReloadState>,
    pub ledger: Arc<Ledger>,
    pub history: Arc<History>,
    /// Dollar budgets counted in this process (all of them without Redis).
    pub budgets: Arc<lumen_plugins::budget::LocalBudgets>,
    /// Dollar budgets shared through Redis, when configured.
    pub shared_budgets: Option<Arc<lumen_plugins::budget::shared::SharedBudgets>>,
    /// The fleet's Redis, when configured (`/admin/redis`).
    pub redis: Option<Arc<lumen_plugins::redis_link::RedisLink>>,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Admin answers are built from memory without reading a body: the connection goes on
        // the keep-alive clock now (the answer is written after this returns).
        crate::conn::request_finished(session);
        let head = session.req_header();
        let path = head.uri.path().to_string();
        let query = head.uri.query().unwrap_or("").to_string();
        let host = head
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let config = self.config.load_full();
        let allowed = config
            .admin_key
            .as_ref()
            .is_none_or(|key| key.admits(&head.headers));
        let reply = if config.admin_key.is_none() && !host.as_deref().is_none_or(local_host) {
            // No key, so the loopback address is the only protection: a page on another site
            // could reach it through a DNS name it re-points at 127.0.0.1 (DNS rebinding). Such
            // requests carry that name as their Host; browsers and tools on the host itself
            // use an address or `localhost`.
            Reply::error(
                StatusCode::FORBIDDEN,
                "without admin_key, the admin listener answers only requests addressed to an IP address or localhost",
                "invalid_request_error",
                "host_not_allowed",
            )
        } else if !allowed {
            Reply::error(
                StatusCode::UNAUTHORIZED,
                "the admin listener needs the admin key (Authorization: Bearer <admin_key>, or as the Basic password)",
                "invalid_request_error",
                "invalid_api_key",
            )
            // Browsers then ask for it (any user name, the key as the password).
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"lumen admin\", charset=\"UTF-8\"")
        } else if head.method != http::Method::GET && head.method != http::Method::HEAD {
            Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "the admin API is read-only: use GET",
                "invalid_request_error",
                "method_not_allowed",
            )
        } else {
            self.route(&path, &query, host.as_deref(), &config).await
        };
        let mut builder = Response::builder()
            .status(reply.status)
            .header(header::CONTENT_TYPE, reply.content_type)
            .header(header::CONTENT_LENGTH, reply.body.len())
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        for (name, value) in reply.headers {
            builder = builder.header(name, value);
        }
        builder.body(reply.body).unwrap_or_default()
    }
}

impl AdminApp {
    async fn route(&self, path: &str, query: &str, host: Option<&str>, config: &Snapshot) -> Reply {
        match path {
            "/metrics" => {
                self.collect_provider_load(config);
                self.collect_budgets(config).await;
                Reply::new(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(),
                )
            }
            "/metrics/summary" => Reply::json(&self.metrics.summary()),
            "/admin/config" => Reply::json(&reports::config(config, &self.reload)),
            "/admin/providers" => {
                let today = self.ledger.query(&Filter::default()).await;
                Reply::json(&reports::providers(config, &self.health, &today))
            }
            "/admin/routes" => Reply::json(&reports::routes(config)),
            "/admin/redis" => Reply::json(&crate::ops::RedisHealth {
                configured: self.redis.is_some(),
                connected: self.redis.as_ref().map(|_| self.health.redis_ok()),
                topology: self.redis.as_ref().and_then(|link| link.last_topology()),
            }),
            "/admin/budgets" => Reply::json(
                &budgets::report(config, &self.budgets, self.shared_budgets.as_ref()).await,
            ),
            "/admin/usage" => match parse_filter(query) {
                Ok(filter) => {
                    let report = self.ledger.query(&filter).await;
                    Reply::json(&reports::usage(&report, self.ledger.backend()))
                }
                Err(message) => Reply::error(
                    StatusCode::BAD_REQUEST,
                    &message,
                    "invalid_request_error",
                    "invalid_parameter",
                ),
            },
            "/admin/timeseries" => match parse_since(query) {
                Ok(since) => Reply::json(&self.history.since(since)),
                Err(message) => Reply::error(
                    StatusCode::BAD_REQUEST,
                    &message,
                    "invalid_request_error",
                    "invalid_parameter",
                ),
            },
            "/openapi.json" => Reply::json(&openapi::document(config, host)),
            "/" => Reply::new(StatusCode::FOUND, "text/plain", "see /ui\n")
                .header(header::LOCATION, "/ui"),
            _ => match ui::page(path, config.admin_assets.as_deref()).await {
                Some(reply) => reply,
                None => Reply::error(
                    StatusCode::NOT_FOUND,
                    "unknown admin endpoint (see /openapi.json, or /ui in a browser)",
                    "invalid_request_error",
                    "unknown_url",
                ),
            },
        }
    }

    /// The configured keys' and tenants' budget gauges, as their windows stand now: a window
    /// that reset since the last request must not keep an alert firing.
    async fn collect_budgets(&self, config: &Snapshot) {
        let report = budgets::report(config, &self.budgets, self.shared_budgets.as_ref()).await;
        for b in report.budgets.iter().filter(|b| b.configured) {
            let used = b
                .windows
                .iter()
                .map(|w| w.used_usd / w.limit_usd.max(1e-6))
                .fold(0.0, f64::max);
            let labels = [b.scope.as_str(), b.name.as_str()];
            self.metrics
                .budget_used
                .with_label_values(&labels)
                .set(used);
            if let Some(alert_at) = b.alert_at {
                self.metrics
                    .budget_alert
                    .with_label_values(&labels)
                    .set(alert_at);
            }
        }
    }

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

/// Whether a Host header names this machine without DNS: `localhost` or an IP literal, with
/// or without a port.
pub(crate) fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => {
            return rest
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// `/admin/timeseries?since=<unix ms>` (default: everything kept).
fn parse_since(query: &str) -> Result<u64, String> {
    let mut since = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("since", v) => {
                since = v
                    .parse()
                    .map_err(|_| format!("`since` must be Unix milliseconds, got `{v}`"))?
            }
            (other, _) => return Err(format!("unknown parameter `{other}` (filters: since)")),
        }
    }
    Ok(since)
}

/// `/admin/usage?key=&tenant=&provider=&model=&from=YYYY-MM-DD&to=YYYY-MM-DD` (days inclusive, UTC;
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
            "tenant" => filter.tenant = Some(value),
            "provider" => filter.provider = Some(value),
            "model" => filter.model = Some(value),
            "from" => filter.from = Some(day(&value)?),
            "to" => filter.to = Some(day(&value)?),
            other => {
                return Err(format!(
                    "unknown parameter `{other}` (filters: key, tenant, provider, model, from, to)"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_and_localhost_are_local_hosts() {
        for ok in [
            "127.0.0.1:9090",
            "127.0.0.1",
            "localhost:9090",
            "LOCALHOST",
            "[::1]:9090",
            "[::1]",
            "10.0.0.5:9090",
        ] {
            assert!(local_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "evil.example",
            "127.0.0.1.nip.io",
            "[::1",
            "localhost.evil.example",
        ] {
            assert!(!local_host(bad), "{bad}");
        }
    }

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
