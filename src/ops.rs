//! What the gateway answers itself on the proxy listener, with no upstream: the probes
//! `/healthz`, `/readyz` and `/health` (no auth), and the model list built from the routing table (only
//! the models the caller may use).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use lumen_plugins::auth::Principal;

use crate::config::raw::Readiness;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::routing::Route;
use crate::upstream::health::{CircuitState, HealthTable, ProbeState};

/// A complete JSON answer.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
        Reply {
            status,
            body: Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
        }
    }
}

/// `GET /healthz`: the process answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Alive {
    /// `ok`.
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ready` (200) or `not_ready` (503).
    pub status: &'static str,
    /// The active config's hash.
    pub config: String,
    pub routes_not_ready: Vec<String>,
}

/// `GET /health`: the node at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok`, `degraded` (some routes have no target that can take a request) or `unavailable`
    /// (none has; 503).
    pub status: &'static str,
    pub version: &'static str,
    /// The active config's hash.
    pub config: String,
    pub routes: RouteCounts,
    pub redis: RedisHealth,
    /// By provider name.
    pub providers: BTreeMap<String, ProviderHealth>,
    /// The models each local sidecar reports loaded, by provider name.
    #[schema(value_type = Object)]
    pub sidecar: BTreeMap<String, serde_json::Value>,
    pub jobs: crate::jobs::JobsHealth,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteCounts {
    pub total: u64,
    pub ready: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RedisHealth {
    pub configured: bool,
    /// The last ping's outcome; absent when Redis is not configured, null before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<bool>)]
    pub connected: Option<Option<bool>>,
    /// The servers as last seen (every few seconds): `kind` (`server`, `cluster`,
    /// `sentinel`), `nodes` (`addr`, `role`: primary, replica or sentinel, `up`, `slots`,
    /// `primary`), `failovers_seen` and `last_failover_at` (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub topology: Option<lumen_plugins::redis_link::Topology>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderHealth {
    /// `up`, `unhealthy` or `quota_exhausted`.
    pub status: &'static str,
    /// `healthy`, `unhealthy` or `unknown` (not probed yet).
    pub probe: &'static str,
    /// Models whose circuit is open.
    pub open_circuits: Vec<String>,
    pub in_flight: u64,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// A model name of the routing table (`GET /v1/models/{model}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// `model`.
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// Whether `path` is a probe's (`/healthz`, `/readyz`, `/health`, a trailing slash allowed):
/// answered before authentication, and never traced (load balancers ask often).
pub fn is_probe(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    matches!(path, "/healthz" | "/readyz" | "/health")
}

/// Probes answered before authentication: `Some` for `/healthz`, `/readyz` and `/health`.
/// `redis` is the fleet's Redis link when Redis is configured.
pub fn answer_probe(
    method: &Method,
    path: &str,
    config: &Snapshot,
    health: &HealthTable,
    redis: Option<&lumen_plugins::redis_link::RedisLink>,
    jobs: &crate::jobs::Jobs,
) -> Option<Result<Reply, GatewayError>> {
    if !is_probe(path) {
        return None;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    if let Err(e) = only_get(method, path) {
        return Some(Err(e));
    }
    Some(Ok(match path {
        // Alive: the process answers.
        "/healthz" => Reply::json(StatusCode::OK, &Alive { status: "ok" }),
        "/readyz" => readiness(config, health),
        _ => health_report(config, health, redis, jobs),
    }))
}

/// Whether a route has a target that could take a request now.
fn route_ready(route: &Route, health: &HealthTable) -> bool {
    let now = health.now_ms();
    route.targets.iter().any(|t| {
        let state = health.get(&t.provider.name);
        // A sidecar still loading its model is not ready, probed or not.
        let probed_ok = !state.starting()
            && match state.probe_state() {
                ProbeState::Healthy => true,
                ProbeState::Unhealthy => false,
                // Not probed yet: ready only if it is never going to be probed.
                ProbeState::Unknown => t.provider.probe.is_none(),
            };
        let model = state.model(&t.health_key);
        // Rate limits and quotas pass; a broken target (open circuit) does not.
        probed_ok && model.circuit.state(now, &t.provider.circuit) != CircuitState::Open
    })
}

/// `/readyz`: 200 when the config's readiness rule holds, else 503 with the routes that fail.
fn readiness(config: &Snapshot, health: &HealthTable) -> Reply {
    let mut ready = Vec::new();
    let mut not_ready = Vec::new();
    for route in config.routes.routes() {
        if route_ready(route, health) {
            ready.push(route.name.as_str());
        } else {
            not_ready.push(route.name.as_str());
        }
    }
    let ok = match config.readiness {
        Readiness::ConfigLoaded => true,
        Readiness::AllRoutes => not_ready.is_empty(),
        Readiness::AnyRoute => !ready.is_empty() || not_ready.is_empty(),
    };
    let (status, word) = if ok {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    Reply::json(
        status,
        &Ready {
            status: word,
            config: config.source.hash.clone(),
            routes_not_ready: not_ready.into_iter().map(str::to_string).collect(),
        },
    )
}

/// `/health`: the node at a glance for humans and dashboards: overall status, version, Redis,
/// each provider's health, and the models a local sidecar has loaded.
fn health_report(
    config: &Snapshot,
    health: &HealthTable,
    redis: Option<&lumen_plugins::redis_link::RedisLink>,
    jobs: &crate::jobs::Jobs,
) -> Reply {
    let now = health.now_ms();
    let mut providers = BTreeMap::new();
    let mut sidecars = BTreeMap::new();
    let mut names: Vec<&String> = config.providers.keys().collect();
    names.sort();
    for name in names {
        let provider = &config.providers[name];
        let state = health.get(name);
        let status = match state.probe_state() {
            ProbeState::Unhealthy => "unhealthy",
            _ if state.quota_wait_ms(now).is_some() => "quota_exhausted",
            _ => "up",
        };
        let open: Vec<String> = state
            .models()
            .into_iter()
            .filter(|(_, m)| m.circuit.state(now, &provider.circuit) == CircuitState::Open)
            .map(|(model, _)| model)
            .collect();
        providers.insert(
            name.clone(),
            ProviderHealth {
                status,
                probe: state.probe_state().label(),
                open_circuits: open,
                in_flight: u64::from(state.in_flight()),
            },
        );
        if let Some(detail) = state.probe_detail.load_full() {
            if let Some(models) = detail.get("models").filter(|m| m.is_object()) {
                sidecars.insert(name.clone(), models.clone());
            }
        }
    }
    let routes_ready = config
        .routes
        .routes()
        .filter(|r| route_ready(r, health))
        .count();
    let routes_total = config.routes.routes().count();
    let word = if routes_ready == routes_total {
        "ok"
    } else if routes_ready > 0 {
        "degraded"
    } else {
        "unavailable"
    };
    Reply::json(
        if word == "unavailable" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        },
        &HealthReport {
            status: word,
            version: env!("CARGO_PKG_VERSION"),
            config: config.source.hash.clone(),
            routes: RouteCounts {
                total: routes_total as u64,
                ready: routes_ready as u64,
            },
            redis: RedisHealth {
                configured: redis.is_some(),
                connected: redis.map(|_| health.redis_ok()),
                topology: redis.and_then(|link| link.last_topology()),
            },
            providers,
            sidecar: sidecars,
            jobs: jobs.health(),
        },
    )
}

/// The model list for an authenticated caller: `Some` for `/v1/models` and `/v1/models/{id}`.
/// Only the models the caller may use are listed or found.
pub fn answer(
    method: &Method,
    path: &str,
    config: &Snapshot,
    principal: &Principal,
) -> Option<Result<Reply, GatewayError>> {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path != "/v1/models" && !path.starts_with("/v1/models/") {
        return None;
    }
    if let Err(e) = only_get(method, path) {
        return Some(Err(e));
    }
    let mut visible = config.routes.model_names().filter(|m| principal.may_use(m));
    Some(match path {
        "/v1/models" => Ok(Reply::json(
            StatusCode::OK,
            &ModelList {
                object: "list",
                data: visible.map(model_object).collect(),
            },
        )),
        _ => {
            let id = &path["/v1/models/".len()..];
            match visible.find(|m| *m == id) {
                Some(m) => Ok(Reply::json(StatusCode::OK, &model_object(m))),
                None => Err(GatewayError::ModelNotFound(id.to_string())),
            }
        }
    })
}

fn only_get(method: &Method, path: &str) -> Result<(), GatewayError> {
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    Err(GatewayError::MethodNotAllowed {
        method: method.to_string(),
        path: path.to_string(),
    })
}

fn model_object(id: &str) -> Model {
    Model {
        id: id.to_string(),
        object: "model",
        created: 0,
        owned_by: "lumen",
    }
}
