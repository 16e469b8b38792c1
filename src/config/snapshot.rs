//! The validated, immutable runtime form of a config file.
//!
//! `build` does every expensive or fallible step once (URL parsing, header
//! encoding, route compilation) so the hot path only reads. A reload builds a whole new
//! `Snapshot` and swaps it in; requests keep the `Arc` they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::path::PathBuf;

use super::problem::{ConfigError, Problem};
use super::providers;
use super::raw::{RawConfig, RawListener, Readiness};
use crate::routing::RouteTable;
use crate::upstream::provider::Provider;
use crate::upstream::supervisor::SpawnSpec;

/// Everything a request needs to know about the configuration, frozen.
pub struct Snapshot {
    pub listeners: Vec<Listener>,
    pub admin_listen: String,
    /// Required on admin requests when set.
    pub admin_key: Option<lumen_plugins::auth::AdminKey>,
    /// Where the admin pages' front-end packages are, when configured (else searched).
    pub admin_assets: Option<PathBuf>,
    /// Usage accounting (read at start-up, except `flush_interval`).
    pub usage: UsageSettings,
    /// Async jobs (queue size and workers are read at start-up).
    pub jobs: crate::jobs::JobSettings,
    /// Files and batches (the Batch API); read at start-up except where said.
    pub batches: crate::batches::BatchSettings,
    pub limits: Limits,
    pub cors: Option<lumen_plugins::cors::Cors>,
    /// API keys and JWT issuers, with their lookup tables built.
    pub auth: lumen_plugins::auth::Authenticator,
    pub server: ServerSettings,
    pub providers: HashMap<String, Arc<Provider>>,
    pub routes: RouteTable,
    /// Sidecars to start and supervise (`spawn:` providers).
    pub spawns: Vec<SpawnSpec>,
    /// Where shared state lives; `None`: in process.
    pub redis: Option<RedisSettings>,
    /// What `/readyz` requires.
    pub readiness: Readiness,
    /// The response cache's store settings (read at start-up).
    pub cache: CacheSettings,
    /// Stored responses: how long they are kept (`max_stored` is read at start-up).
    pub responses: super::raw::RawResponses,
    /// Files besides the config itself whose change triggers a reload (JWT keys).
    pub watched: Vec<PathBuf>,
    /// Prices per provider and model (`prices:`, then `prices_file:`'s catalog).
    pub prices: Arc<crate::price::PriceTable>,
    /// Tenants' dollar budgets, by tenant name.
    pub tenants: HashMap<String, Arc<lumen_plugins::budget::Budget>>,
    /// OpenTelemetry traces (read at start-up); `None`: off.
    pub tracing: Option<crate::telemetry::TracingSettings>,
    /// Where it came from, for `/admin/config` and logs.
    pub source: Source,
}

/// Identity of the file a snapshot was built from.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: String,
    /// FNV-1a of the file's bytes as read (before `${VAR}` substitution, so secrets don't leak
    /// through it), in hex.
    pub hash: String,
    pub loaded_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: String,
    pub tls: Option<(String, String)>,
    pub h2c: bool,
}

/// The cache store's settings.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub memory_bytes: u64,
    pub redis: bool,
    pub coalesce_wait: Duration,
}

/// The validated `redis:` section.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Where the servers are and how to log in (its `Debug` hides the password).
    pub link: lumen_plugins::redis_link::LinkSettings,
    pub prefix: String,
    pub timeout: Duration,
    pub on_error: lumen_plugins::rate_limit::shared::OnRedisError,
    /// This node's share of each dollar budget while Redis is down (fail-open).
    pub local_budget_share: f64,
}

/// The validated `usage:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSettings {
    pub enabled: bool,
    pub state_dir: PathBuf,
    pub flush_interval: Duration,
    pub retention_days: u32,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub per_ip: Option<PerAddress>,
}

/// The validated `limits.per_ip`.
#[derive(Debug, Clone)]
pub struct PerAddress {
    pub limit: lumen_plugins::rate_limit::RequestLimit,
    /// Leading bits of an IPv6 address that name one client (1–128).
    pub ipv6_prefix: u8,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    pub runtime: super::raw::RuntimeModel,
    pub grace_period: Duration,
    pub access_log: bool,
    pub watch_config: bool,
    pub upgrade_sock: String,
    /// Peers whose `X-Forwarded-For` is believed; empty: none.
    pub trusted_proxies: Vec<lumen_plugins::address::Cidr>,
    /// Client connection limits (read at start-up).
    pub connections: crate::conn::ConnLimits,
}

/// The prober reads the live config's providers each round.
impl crate::upstream::health::probe::ProviderList for arc_swap::ArcSwap<Snapshot> {
    fn providers(&self) -> Vec<Arc<Provider>> {
        self.load().providers.values().cloned().collect()
    }
}

/// Validates `raw` fully and returns the runtime snapshot, or every problem found.
pub fn build(raw: RawConfig, source: Source) -> Result<Snapshot, ConfigError> {
    let mut problems = Vec::new();

    let listeners = raw
        .listen
        .into_iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let listener = match l {
                RawListener::Addr(addr) => Listener {
                    addr,
                    tls: None,
                    h2c: false,
                },
                RawListener::Full(f) => Listener {
                    addr: f.addr,
                    tls: f.tls.map(|t| (t.cert, t.key)),
                    h2c: f.h2c,
                },
            };
            if let Err(e) = listener.addr.parse::<SocketAddr>() {
                problems.push(Problem::at(
                    format!("listen[{i}]"),
                    format!(
                        "`{}` is not an address such as 0.0.0.0:8080 ({e})",
                        listener.addr
                    ),
                ));
                return None;
            }
            if let Some((cert, key)) = &listener.tls {
                for (what, file) in [("cert", cert), ("key", key)] {
                    if !std::path::Path::new(file).is_file() {
                        problems.push(Problem::at(
                            format!("listen[{i}].tls.{what}"),
                            format!("file `{file}` does not exist"),
                        ));
                    }
                }
            }
            Some(listener)
        })
        .collect::<Vec<Listener>>();
    match raw.admin_listen.parse::<SocketAddr>() {
        Err(e) => problems.push(Problem::at(
            "admin_listen",
            format!("`{}` is not an address ({e})", raw.admin_listen),
        )),
        // Usage, config and health are an operator's business: beyond this host, only with a key.
        Ok(addr) if !addr.ip().is_loopback() && raw.admin_key.is_none() => {
            problems.push(Problem::at(
                "admin_listen",
                format!(
                    "`{}` is reachable from other hosts: set `admin_key` (sha256 from `lumen keys hash`, or key: ${{ENV}}), or listen on 127.0.0.1",
                    raw.admin_listen
                ),
            ))
        }
        Ok(_) => {}
    }
    let admin_key = match raw
        .admin_key
        .as_ref()
        .map(lumen_plugins::auth::AdminKey::from_config)
    {
        None => None,
        Some(Ok(key)) => Some(key),
        Some(Err((field, message))) => {
            problems.push(Problem::at(format!("admin_key.{field}"), message));
            None
        }
    };
    if raw.usage.flush_interval.is_zero() {
        problems.push(Problem::at("usage.flush_interval", "must be above zero"));
    }
    for (key, value) in [
        ("server.header_timeout", raw.server.header_timeout),
        ("server.keepalive_timeout", raw.server.keepalive_timeout),
        ("server.body_timeout", raw.server.body_timeout),
    ] {
        if value.is_zero() {
            problems.push(Problem::at(key, "must be above zero"));
        }
    }
    if raw.responses.store_ttl.is_zero() {
        problems.push(Problem::at(
            "responses.store_ttl",
            "must be above zero (send `store: false` to store nothing)",
        ));
    }
    if raw.responses.max_stored == 0 {
        problems.push(Problem::at("responses.max_stored", "must be at least 1"));
    }
    if raw.server.max_connections == 0 {
        problems.push(Problem::at("server.max_connections", "must be at least 1"));
    }
    // Below 1 KiB ordinary requests fail; above Pingora's own 1 MiB limit, Pingora refuses first.
    if !(1024..=1024 * 1024 - 1).contains(&raw.server.max_header_bytes.0) {
        problems.push(Problem::at(
            "server.max_header_bytes",
            "must be between 1KiB and 1048575 bytes (Pingora's own limit)",
        ));
    }
    if raw.usage.retention_days == 0 {
        problems.push(Problem::at("usage.retention_days", "must be at least 1"));
    }
    let jobs = crate::jobs::JobSettings::build(&raw.jobs, &mut problems);
    let batches = crate::batches::BatchSettings::build(&raw.batches, &jobs, &mut problems);
    let usage = UsageSettings {
        enabled: raw.usage.enabled,
        state_dir: usage_state_dir(raw.usage.state_dir.as_deref(), &source.path),
        flush_interval: raw.usage.flush_interval,
        retention_days: raw.usage.retention_days,
    };

    let mut providers = HashMap::new();
    let mut spawns = Vec::new();
    for (name, mut p) in raw.providers {
        let spawned = p.spawn.is_some();
        if let Some(spawn) = p.spawn.take() {
            match providers::build_spawn(&name, &p.base_url, spawn) {
                Ok(spec) => spawns.push(spec),
                Err(problem) => problems.push(problem),
            }
        }
        match providers::build_provider(&name, p, spawned) {
            Ok(provider) => {
                providers.insert(name, Arc::new(provider));
            }
            Err(mut p) => problems.append(&mut p),
        }
    }

    let cors = match raw.cors.map(lumen_plugins::cors::Cors::new).transpose() {
        Ok(cors) => cors,
        Err(e) => {
            problems.push(Problem::at("cors", e.to_string()));
            None
        }
    };

    let prices = Arc::new(build_prices(
        &raw.prices,
        raw.prices_file.as_deref(),
        &source.path,
        &mut problems,
    ));
    let routes = RouteTable::build(&raw.routes, &providers, &prices, &mut problems);
    let mut tenants = HashMap::new();
    for (name, tenant) in &raw.tenants {
        match lumen_plugins::budget::Budget::from_config(&tenant.budget) {
            Ok(budget) => {
                tenants.insert(name.clone(), Arc::new(budget));
            }
            Err(e) => problems.push(Problem::at(format!("tenants.{name}.budget"), e)),
        }
    }
    let per_ip = raw.limits.per_ip.as_ref().and_then(|r| {
        let rate = lumen_plugins::rate_limit::RateConfig {
            requests_per_second: r.requests_per_second,
            requests_per_minute: r.requests_per_minute,
            burst: r.burst,
        };
        if !(1..=128).contains(&r.ipv6_prefix) {
            problems.push(Problem::at(
                "limits.per_ip.ipv6_prefix",
                "must be 1 to 128 (64: one client per /64, the usual allocation)",
            ));
        }
        match rate.to_limit() {
            Ok(limit) => Some(PerAddress {
                limit,
                ipv6_prefix: r.ipv6_prefix,
            }),
            Err(e) => {
                problems.push(Problem::at("limits.per_ip", e));
                None
            }
        }
    });
    let mut trusted_proxies = Vec::with_capacity(raw.server.trusted_proxies.len());
    for (i, block) in raw.server.trusted_proxies.iter().enumerate() {
        match block.parse::<lumen_plugins::address::Cidr>() {
            Ok(cidr) => trusted_proxies.push(cidr),
            Err(e) => problems.push(Problem::at(format!("server.trusted_proxies[{i}]"), e)),
        }
    }

    let redis = raw.redis.and_then(|r| redis_settings(r, &mut problems));
    let tracing = raw.tracing.and_then(|t| tracing_settings(t, &mut problems));

    let watched = raw
        .jwt
        .iter()
        .flat_map(|j| [j.public_key_file.as_ref(), j.jwks_file.as_ref()])
        .flatten()
        .map(PathBuf::from)
        .collect();
    let auth = match lumen_plugins::auth::Authenticator::new(raw.auth, &raw.keys, &raw.jwt) {
        Ok(auth) => Some(auth),
        Err(found) => {
            problems.extend(
                found
                    .into_iter()
                    .map(|(path, message)| Problem::at(path, message)),
            );
            None
        }
    };

    let auth = match auth {
        Some(auth) if problems.is_empty() => auth,
        _ => {
            return Err(ConfigError::Invalid {
                path: source.path,
                problems,
            })
        }
    };
    Ok(Snapshot {
        listeners,
        admin_listen: raw.admin_listen,
        admin_key,
        admin_assets: raw.admin_assets.as_deref().map(|dir| {
            std::path::Path::new(&source.path)
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(dir)
        }),
        usage,
        jobs,
        batches,
        limits: Limits {
            max_body_bytes: raw.limits.max_body_bytes.0,
            per_ip,
        },
        cors,
        auth,
        server: ServerSettings {
            threads: raw.server.threads,
            runtime: raw.server.runtime,
            grace_period: raw.server.grace_period,
            access_log: raw.server.access_log,
            watch_config: raw.server.watch_config,
            upgrade_sock: raw.server.upgrade_sock,
            trusted_proxies,
            connections: crate::conn::ConnLimits {
                header_timeout: raw.server.header_timeout,
                keepalive_timeout: raw.server.keepalive_timeout,
                max_connections: raw.server.max_connections,
                max_header_bytes: raw.server.max_header_bytes.0,
                body_timeout: raw.server.body_timeout,
            },
        },
        providers,
        routes,
        spawns,
        redis,
        readiness: raw.readiness,
        watched,
        cache: CacheSettings {
            memory_bytes: raw.cache.memory.0 as u64,
            redis: raw.cache.redis,
            coalesce_wait: raw.cache.coalesce_wait,
        },
        responses: raw.responses,
        prices,
        tenants,
        tracing,
        source,
    })
}

/// The `tracing:` section checked: an http(s) collector URL, a known protocol, a share.
fn tracing_settings(
    t: super::raw::RawTracing,
    problems: &mut Vec<Problem>,
) -> Option<crate::telemetry::TracingSettings> {
    use crate::telemetry::{OtlpProtocol, TracingSettings};
    let before = problems.len();
    let protocol = match t.protocol.as_str() {
        "http" => OtlpProtocol::Http,
        "grpc" => OtlpProtocol::Grpc,
        other => {
            problems.push(Problem::at(
                "tracing.protocol",
                format!("`{other}` is not a protocol (http or grpc)"),
            ));
            OtlpProtocol::Http
        }
    };
    match t.otlp.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
        _ => problems.push(Problem::at(
            "tracing.otlp",
            format!("`{}` is not an http:// or https:// URL", t.otlp),
        )),
    }
    let tls_ca = t
        .tls_ca_file
        .as_ref()
        .and_then(|path| match std::fs::read(path) {
            Ok(pem) if crate::telemetry::pem_certificates(&pem).is_ok() => Some(pem),
            Ok(_) => {
                let why = format!("{} holds no PEM certificate", path.display());
                problems.push(Problem::at("tracing.tls_ca_file", why));
                None
            }
            Err(e) => {
                let why = format!("cannot read {}: {e}", path.display());
                problems.push(Problem::at("tracing.tls_ca_file", why));
                None
            }
        });
    let mut headers = Vec::new();
    for (name, value) in t.headers {
        let name = name.to_ascii_lowercase();
        let named = http::HeaderName::from_bytes(name.as_bytes()).is_ok();
        if !named || http::HeaderValue::from_str(&value).is_err() {
            // The value may be a substituted secret: only the name is quoted.
            let at = format!("tracing.headers.{name}");
            problems.push(Problem::at(at, "not a valid HTTP header name and value"));
        } else {
            headers.push((name, value));
        }
    }
    if !(0.0..=1.0).contains(&t.sample) {
        problems.push(Problem::at(
            "tracing.sample",
            format!("{} is not a share between 0 and 1", t.sample),
        ));
    }
    if t.service_name.trim().is_empty() {
        problems.push(Problem::at("tracing.service_name", "must not be empty"));
    }
    if t.timeout.is_zero() || t.export_every.is_zero() {
        problems.push(Problem::at(
            "tracing",
            "timeout and export_every must be above zero",
        ));
    }
    (problems.len() == before).then_some(TracingSettings {
        otlp: t.otlp,
        protocol,
        sample: t.sample,
        service_name: t.service_name,
        capture_content: t.capture_content,
        trust_traceparent: t.trust_traceparent,
        timeout: t.timeout,
        every: t.export_every,
        tls_ca,
        headers,
    })
}

/// The price table: the operator's `prices:`, then the catalog `prices_file:` names (relative
/// to the config file). Problems are pushed with their place.
fn build_prices(
    operator: &[crate::price::RawPrice],
    file: Option<&str>,
    config_path: &str,
    problems: &mut Vec<Problem>,
) -> crate::price::PriceTable {
    let catalog = file.and_then(|file| {
        let path = std::path::Path::new(config_path)
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(file);
        let read = std::fs::read_to_string(&path).map_err(|e| e.to_string());
        let parsed = read.and_then(|text| {
            serde_yaml::from_str::<crate::price::RawPriceFile>(&text).map_err(|e| e.to_string())
        });
        match parsed {
            Ok(catalog) => Some((path.display().to_string(), catalog)),
            Err(e) => {
                problems.push(Problem::at(
                    "prices_file",
                    format!("cannot read `{}`: {e}", path.display()),
                ));
                None
            }
        }
    });
    let catalog = catalog.as_ref().map(|(p, c)| (p.as_str(), c));
    match crate::price::PriceTable::build(operator, catalog) {
        Ok(table) => table,
        Err(e) => {
            problems.push(Problem::at("prices", e));
            crate::price::PriceTable::default()
        }
    }
}

impl Snapshot {
    /// Routed models without a price (`lumen check` warns: their requests are counted as
    /// free and no dollar budget limits them).
    pub fn unpriced(&self) -> Vec<String> {
        let mut found = Vec::new();
        for route in self.routes.routes() {
            for target in &route.targets {
                let model = target.model_name();
                let provider = &target.provider.name;
                if model == "*" {
                    if !self.prices.prices_provider(provider) {
                        found.push(format!(
                            "route `{}`: passes the client's model name to provider `{provider}`, which has no entry in `prices:` (its requests are counted as free, and budgeted keys are refused)",
                            route.name
                        ));
                    }
                } else if target.price.is_none() {
                    found.push(format!(
                        "route `{}`: no price for provider `{provider}` model `{model}` (add it to `prices:` or set it to 0 if it is free; budgeted keys are refused there)",
                        route.name
                    ));
                }
            }
        }
        found
    }
}

/// `usage.state_dir`, else systemd's `$STATE_DIRECTORY` (its first entry), else `state/`
/// beside the config file.
fn usage_state_dir(configured: Option<&str>, config_path: &str) -> PathBuf {
    if let Some(dir) = configured {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = dir.to_string_lossy().split(':').find(|d| !d.is_empty()) {
            return PathBuf::from(first);
        }
    }
    std::path::Path::new(config_path)
        .parent()
        .map_or_else(|| PathBuf::from("state"), |p| p.join("state"))
}

fn redis_url_ok(url: &str) -> Result<(), String> {
    match url.split_once("://") {
        Some(("redis" | "rediss", rest)) if !rest.is_empty() => Ok(()),
        _ => Err(format!(
            "`{}` is not a redis:// or rediss:// URL",
            lumen_plugins::redis_link::hide_password(url)
        )),
    }
}

/// The `redis:` section checked: one topology, well-formed URLs, a readable CA file.
fn redis_settings(r: super::raw::RawRedis, problems: &mut Vec<Problem>) -> Option<RedisSettings> {
    use lumen_plugins::redis_link::{LinkSettings, Servers};
    let before = problems.len();
    if r.prefix.is_empty() || r.prefix.contains(['{', '}']) {
        // Keys are hash-tagged `{prefix:…}` so each script's keys share a Cluster slot; a
        // brace in the prefix would move the tag and split them.
        problems.push(Problem::at(
            "redis.prefix",
            "must be non-empty and contain no `{` or `}`",
        ));
    }
    if !(r.local_budget_share > 0.0 && r.local_budget_share <= 1.0) {
        problems.push(Problem::at(
            "redis.local_budget_share",
            "must be above 0 and at most 1 (1/N for a fleet of N nodes)",
        ));
    }
    let check_urls = |problems: &mut Vec<Problem>, path: &str, urls: &[String]| {
        for (i, url) in urls.iter().enumerate() {
            if let Err(e) = redis_url_ok(url) {
                problems.push(Problem::at(format!("{path}[{i}]"), e));
            }
        }
    };
    let servers = match (r.url, r.cluster, r.sentinel) {
        (Some(url), None, None) => {
            if let Err(e) = redis_url_ok(&url) {
                problems.push(Problem::at("redis.url", e));
            }
            Servers::One(url)
        }
        (None, Some(nodes), None) => {
            if nodes.is_empty() {
                problems.push(Problem::at(
                    "redis.cluster",
                    "name at least one node of the cluster",
                ));
            }
            check_urls(problems, "redis.cluster", &nodes);
            Servers::Cluster(nodes)
        }
        (None, None, Some(s)) => {
            if s.nodes.is_empty() {
                problems.push(Problem::at(
                    "redis.sentinel.nodes",
                    "name at least one Sentinel",
                ));
            }
            if s.master.trim().is_empty() {
                problems.push(Problem::at(
                    "redis.sentinel.master",
                    "the master's name as the Sentinels know it",
                ));
            }
            check_urls(problems, "redis.sentinel.nodes", &s.nodes);
            Servers::Sentinel {
                master: s.master,
                nodes: s.nodes,
            }
        }
        _ => {
            problems.push(Problem::at(
                "redis",
                "set exactly one of `url` (one server), `cluster` (Redis Cluster) and `sentinel`",
            ));
            return None;
        }
    };
    let tls_ca = match &r.tls_ca_file {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                problems.push(Problem::at(
                    "redis.tls_ca_file",
                    format!("cannot read {}: {e}", path.display()),
                ));
                None
            }
        },
    };
    (problems.len() == before).then_some(RedisSettings {
        link: LinkSettings {
            servers,
            username: r.username,
            password: r.password,
            tls_ca,
            timeout: r.timeout,
        },
        prefix: r.prefix,
        timeout: r.timeout,
        on_error: r.on_redis_error,
        local_budget_share: r.local_budget_share,
    })
}
