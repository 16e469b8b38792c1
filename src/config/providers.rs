//! Building a provider from its YAML: the base URL (host, path, DNS), credentials and extra
//! headers, timeouts, the health probe, circuit and quota settings, and a `spawn:` sidecar's
//! command line. Every problem is reported with its YAML path.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::problem::Problem;
use super::raw::{RawHealth, RawProvider, RawSpawn};
use crate::upstream::health::CircuitConfig;
use crate::upstream::provider::{Api, ProbeSpec, Provider, QuotaSpec, ANTHROPIC_VERSION};
use crate::upstream::resolve::{Resolver, Upstream};
use crate::upstream::supervisor::SpawnSpec;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: a non-streaming completion may take minutes before its header arrives.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub(super) fn build_spawn(
    name: &str,
    base_url: &str,
    spawn: RawSpawn,
) -> Result<SpawnSpec, Problem> {
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

pub(super) fn build_provider(
    name: &str,
    p: RawProvider,
    spawned: bool,
) -> Result<Provider, Vec<Problem>> {
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

    let credential = match p.api_key.as_deref().filter(|k| !k.is_empty()) {
        None => None,
        Some(key) => match match p.api {
            Api::Openai | Api::Responses => HeaderValue::from_str(&format!("Bearer {key}"))
                .map(|v| (http::header::AUTHORIZATION, v)),
            Api::Anthropic => {
                HeaderValue::from_str(key).map(|v| (HeaderName::from_static("x-api-key"), v))
            }
        } {
            Ok((name, mut v)) => {
                v.set_sensitive(true);
                Some((name, v))
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
    if p.api == Api::Anthropic && !headers.iter().any(|(n, _)| n == "anthropic-version") {
        headers.push((
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(ANTHROPIC_VERSION),
        ));
    }
    if p.api == Api::Anthropic && spawned {
        problems.push(Problem::at(
            here("api"),
            "a spawned sidecar speaks the OpenAI API; `api: anthropic` is for Messages API providers",
        ));
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
    let targets = crate::openai::Endpoint::ALL.map(|endpoint| {
        let path = crate::upstream::provider::endpoint_path(&base_path, p.api, endpoint);
        let uri =
            pingora::http::RequestHeader::build_no_case(http::Method::POST, path.as_bytes(), None)
                .ok()?
                .uri
                .clone();
        // Kept only where a head made from the parsed target writes out the very same bytes.
        let mut parts = http::Request::new(()).into_parts().0;
        parts.uri = uri.clone();
        let head = pingora::http::RequestHeader::from(parts);
        (head.raw_path() == path.as_bytes()).then_some(uri)
    });
    Ok(Provider {
        name: name.to_string(),
        name_value: HeaderValue::from_str(name).ok(),
        peer: Resolver::new(upstream),
        host: HeaderValue::from_str(&host_header).map_err(|_| {
            vec![Problem::at(
                here("base_url"),
                "host is not a valid header value",
            )]
        })?,
        base_path,
        targets,
        api: p.api,
        credential,
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
        series: Default::default(),
    })
}
