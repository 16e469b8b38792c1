//! The validated, immutable runtime form of a config file.
//!
//! `build` does every expensive or fallible step once (URL parsing, header
//! encoding, route compilation) so the hot path only reads. A reload builds a whole new
//! `Snapshot` and swaps it in; requests keep the `Arc` they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};

use std::path::PathBuf;

use super::problem::{ConfigError, Problem};
use super::raw::{RawConfig, RawHealth, RawListener, RawProvider, RawSpawn, Readiness};
use crate::routing::RouteTable;
use crate::upstream::health::CircuitConfig;
use crate::upstream::provider::{ProbeSpec, Provider, QuotaSpec};
use crate::upstream::resolve::{Resolver, Upstream};
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
    /// Files besides the config itself whose change triggers a reload (JWT keys).
    pub watched: Vec<PathBuf>,
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
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    pub on_error: lumen_plugins::rate_limit::shared::OnRedisError,
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

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: a non-streaming completion may take minutes before its header arrives.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

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
            match build_spawn(&name, &p.base_url, spawn) {
                Ok(spec) => spawns.push(spec),
                Err(problem) => problems.push(problem),
            }
        }
        match build_provider(&name, p, spawned) {
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

    let routes = RouteTable::build(&raw.routes, &providers, &mut problems);
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

    let redis = raw.redis.map(|r| RedisSettings {
        url: r.url,
        prefix: r.prefix,
        timeout: r.timeout,
        on_error: r.on_redis_error,
    });
    if let Some(r) = &redis {
        if let Err(e) = redis_url_ok(&r.url) {
            problems.push(Problem::at("redis.url", e));
        }
    }

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
        limits: Limits {
            max_body_bytes: raw.limits.max_body_bytes.0,
            per_ip,
        },
        cors,
        auth,
        server: ServerSettings {
            threads: raw.server.threads,
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
        source,
    })
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
        _ => Err(format!("`{url}` is not a redis:// URL")),
    }
}

fn build_spawn(name: &str, base_url: &str, spawn: RawSpawn) -> Result<SpawnSpec, Problem> {
    let at = |field: &str| format!("providers.{name}.{field}");
    let url: http::Uri = base_url
        .parse()
        .map_err(|_| Problem::at(at("base_url"), "is not a URL"))?;
    let host = url
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback || url.scheme_str() != Some("http") {
        return Err(Problem::at(
            at("spawn"),
            format!("a spawned sidecar listens on loopback: base_url must be http://127.0.0.1:PORT/v1, not `{base_url}`"),
        ));
    }
    let Some(port) = url.port_u16() else {
        return Err(Problem::at(
            at("base_url"),
            "a spawned sidecar needs an explicit port",
        ));
    };
    let model_path = std::path::Path::new(&spawn.model);
    if !model_path.is_file() {
        return Err(Problem::at(
            at("spawn.model"),
            format!(
                "model file `{}` does not exist (for the quickstart model run `lumen-llama fetch-model smollm2`)",
                spawn.model
            ),
        ));
    }
    let alias = spawn.alias.unwrap_or_else(|| {
        model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    Ok(SpawnSpec {
        provider: name.to_string(),
        binary: spawn
            .binary
            .map(PathBuf::from)
            .unwrap_or_else(default_sidecar_binary),
        host: host.to_string(),
        port,
        models: vec![match spawn.options.as_deref().filter(|o| !o.is_empty()) {
            Some(options) => format!("{alias}={}:{options}", spawn.model),
            None => format!("{alias}={}", spawn.model),
        }],
        args: spawn.args,
    })
}

/// `lumen-llama` beside the running `lumen` binary, else whatever PATH finds.
fn default_sidecar_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("lumen-llama")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("lumen-llama"))
}

/// The probe for a provider: `health:` as written, defaulting to the base URL's `/models`
/// (free at every OpenAI-compatible provider), or `/health` for a spawned sidecar.
fn build_probe(
    name: &str,
    raw: Option<&RawHealth>,
    base_path: &str,
    spawned: bool,
    problems: &mut Vec<Problem>,
) -> Option<ProbeSpec> {
    // A spawned sidecar is probed every second and trusted again on its first good answer:
    // it is local and cheap to ask, and clients wait on it while it loads.
    let default = if spawned {
        RawHealth {
            interval: Duration::from_secs(1),
            healthy_threshold: 1,
            ..RawHealth::default()
        }
    } else {
        RawHealth::default()
    };
    let h = raw.unwrap_or(&default);
    if !h.enabled {
        return None;
    }
    let at = |field: &str| format!("providers.{name}.health.{field}");
    if h.interval < Duration::from_millis(10) {
        problems.push(Problem::at(at("interval"), "must be at least 10ms"));
    }
    if h.timeout.is_zero() {
        problems.push(Problem::at(at("timeout"), "must be above zero"));
    }
    if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
        problems.push(Problem::at(
            at("healthy_threshold"),
            "thresholds must be at least 1",
        ));
    }
    let path = match (&h.path, h.tcp) {
        (_, true) => None,
        (Some(path), false) if path.starts_with('/') => Some(path.clone()),
        (Some(path), false) => {
            problems.push(Problem::at(
                at("path"),
                format!("`{path}` must start with `/` (a path on the provider's host)"),
            ));
            None
        }
        (None, false) if spawned => Some("/health".to_string()),
        (None, false) => Some(format!("{base_path}/models")),
    };
    let lenient = h.path.is_none() && !h.tcp && !spawned;
    Some(ProbeSpec {
        lenient,
        path,
        interval: h.interval,
        timeout: h.timeout,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    })
}

fn build_provider(name: &str, p: RawProvider, spawned: bool) -> Result<Provider, Vec<Problem>> {
    let here = |field: &str| format!("providers.{name}.{field}");
    let mut problems = Vec::new();
    let url: http::Uri = match p.base_url.parse() {
        Ok(u) => u,
        Err(e) => {
            return Err(vec![Problem::at(
                here("base_url"),
                format!("`{}` is not a URL ({e})", p.base_url),
            )])
        }
    };
    let tls = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(vec![Problem::at(
                here("base_url"),
                format!("`{}` must start with http:// or https://", p.base_url),
            )])
        }
    };
    let Some(host) = url.host().map(str::to_string) else {
        return Err(vec![Problem::at(
            here("base_url"),
            format!("`{}` has no host", p.base_url),
        )]);
    };
    let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host_for_dns = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let host_header = match url.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    };
    let timeout = p.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let idle_timeout = p.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let upstream = Upstream {
        host: host_for_dns,
        port,
        tls,
        connect_timeout: p.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        read_timeout: timeout,
        idle_timeout,
    };

    let authorization = match p.api_key.as_deref().filter(|k| !k.is_empty()) {
        None => None,
        Some(key) => match HeaderValue::from_str(&format!("Bearer {key}")) {
            Ok(mut v) => {
                v.set_sensitive(true);
                Some(v)
            }
            Err(_) => {
                problems.push(Problem::at(
                    here("api_key"),
                    "contains characters not allowed in a header",
                ));
                None
            }
        },
    };
    let mut headers = Vec::new();
    for (k, v) in &p.headers {
        match (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            (Ok(name), Ok(mut value)) => {
                value.set_sensitive(true);
                headers.push((name, value));
            }
            _ => problems.push(Problem::at(
                here(&format!("headers.{k}")),
                "is not a valid HTTP header",
            )),
        }
    }
    let base_path = url.path().trim_end_matches('/').to_string();
    let probe = build_probe(name, p.health.as_ref(), &base_path, spawned, &mut problems);
    let circuit = p.circuit.clone().unwrap_or_default();
    if !(circuit.error_ratio > 0.0 && circuit.error_ratio <= 1.0) {
        problems.push(Problem::at(
            here("circuit.error_ratio"),
            "must be above 0 and at most 1",
        ));
    }
    if circuit.failures == 0 || circuit.min_requests == 0 {
        problems.push(Problem::at(
            here("circuit.failures"),
            "failures and min_requests must be at least 1",
        ));
    }
    if circuit.cooldown.is_zero() || circuit.window.is_zero() {
        problems.push(Problem::at(
            here("circuit.cooldown"),
            "cooldown and window must be above zero",
        ));
    }
    if let Some(q) = &p.quota {
        let values = [
            q.requests_per_minute,
            q.requests_per_day,
            q.tokens_per_minute,
            q.tokens_per_day,
        ];
        if values.contains(&Some(0)) {
            problems.push(Problem::at(
                here("quota"),
                "a quota of 0 would never let a request through; remove the provider from routes instead",
            ));
        }
    }
    if p.max_in_flight == Some(0) {
        problems.push(Problem::at(here("max_in_flight"), "must be at least 1"));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Provider {
        name: name.to_string(),
        peer: Resolver::new(upstream),
        host: HeaderValue::from_str(&host_header).map_err(|_| {
            vec![Problem::at(
                here("base_url"),
                "host is not a valid header value",
            )]
        })?,
        base_path,
        authorization,
        headers,
        timeout,
        idle_timeout,
        expose_models: p.expose_models,
        probe,
        circuit: CircuitConfig {
            failures: circuit.failures,
            error_ratio: circuit.error_ratio,
            window: circuit.window,
            min_requests: circuit.min_requests,
            cooldown: circuit.cooldown,
        },
        quota: p
            .quota
            .as_ref()
            .map(|q| {
                QuotaSpec::new(
                    q.requests_per_minute,
                    q.requests_per_day,
                    q.tokens_per_minute,
                    q.tokens_per_day,
                )
            })
            .unwrap_or_default(),
        max_in_flight: p.max_in_flight,
    })
}
