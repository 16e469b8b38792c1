//! Lumen: an OpenAI-compatible LLM gateway for the edge, built on Pingora.
//!
//! The crate is the gateway as a library, so an operator with their own Pingora server can
//! mount it as one more service ([`proxy_service`], [`admin_service`]); the `lumen` binary is a
//! thin CLI over [`run`].
//!
//! | module | what it does |
//! |---|---|
//! | [`config`] | YAML → validated, immutable [`config::Snapshot`] (read through `arc-swap`) |
//! | [`pipeline`] | the `ProxyHttp` impl: the request pipeline, phase by phase |
//! | [`openai`] | endpoints and the few body fields routing needs |
//! | [`routing`] | model name → route → targets |
//! | [`cache`] | the cache step: hits, SSE replay, coalesced followers, recording misses |
//! | [`balance`] | a route's targets in the order its strategy and their health give |
//! | [`forward`] | the attempt loop: fallback, retries, commit point, streaming back |
//! | [`retry`] | what is retried, backoff, deadline |
//! | [`health`] | per-provider health: circuit breaker, active probes, provider quotas |
//! | [`resolve`] | provider host → peer: lazy, cached DNS off the config path |
//! | [`ops`] | `/healthz`, `/readyz`, `/v1/models` |
//! | [`notify`] | systemd readiness (`Type=notify`): ready, reloading, stopping, watchdog |
//! | [`reload`] | hot reload: `SIGHUP` and file changes, validate, swap |
//! | [`sidecar`] | starts and supervises `spawn:` sidecars (`lumen-llama`) |
//! | [`usage`] | token usage read off responses as they stream (token budgets) |
//! | [`admin`] | the admin listener: `/metrics`, `/admin/providers` |
//! | [`access_log`] | one JSON line per request, written off the request path |
//! | [`metrics`] | the Prometheus registry |
//! | [`error`] | every failure and its one mapping to status + OpenAI error body |
//!
//! Edge policies (CORS, and later auth, limits, cache) live in the `lumen-plugins` crate.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod cache;
pub mod config;
pub mod ctx;
pub mod error;
pub mod forward;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod openai;
pub mod ops;
pub mod pipeline;
pub mod reload;
pub mod resolve;
pub mod retry;
pub mod routing;
pub mod sidecar;
pub mod usage;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::{http_proxy_service, HttpProxy};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;

pub use config::Snapshot;
pub use metrics::Metrics;
pub use pipeline::Gateway;

/// Errors from building the gateway's services.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("listener {addr}: {reason}")]
    Listener { addr: String, reason: String },
}

/// The proxy service on the snapshot's listeners, ready to add to a Pingora `Server`.
pub fn proxy_service(
    server_conf: &Arc<ServerConf>,
    gateway: Gateway,
) -> Result<Service<HttpProxy<Gateway>>, SetupError> {
    let snapshot = gateway.config.load_full();
    let mut service = http_proxy_service(server_conf, gateway);
    let mut h2c = false;
    for listener in &snapshot.listeners {
        match &listener.tls {
            None => {
                h2c |= listener.h2c;
                service.add_tcp(&listener.addr);
            }
            Some((cert, key)) => {
                let mut tls =
                    TlsSettings::intermediate(cert, key).map_err(|e| SetupError::Listener {
                        addr: listener.addr.clone(),
                        reason: e.to_string(),
                    })?;
                tls.enable_h2();
                service.add_tls_with_settings(&listener.addr, None, tls);
            }
        }
    }
    if h2c {
        if let Some(app) = service.app_logic_mut() {
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            app.server_options = Some(options);
        }
    }
    Ok(service)
}

/// The admin service (`/metrics`, `/admin/providers`) on the snapshot's admin address.
pub fn admin_service(
    gateway: &Gateway,
    reload: Arc<reload::ReloadState>,
) -> impl pingora::services::ServiceWithDependents {
    let snapshot = gateway.config.load_full();
    let mut service = Service::new(
        "lumen admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(admin::AdminApp {
            metrics: gateway.metrics.clone(),
            config: gateway.config.clone(),
            health: gateway.health(),
            reload,
        }),
    );
    service.add_tcp(&snapshot.admin_listen);
    service
}

/// The background service that probes every provider of the live config.
pub fn health_prober(gateway: &Gateway) -> impl pingora::services::ServiceWithDependents {
    pingora::services::background::background_service(
        "lumen health prober",
        health::probe::Prober {
            config: gateway.config.clone(),
            health: gateway.health(),
            metrics: gateway.metrics.clone(),
            redis: gateway.redis(),
        },
    )
}

/// Loads `config_path`, builds the Pingora server with the proxy and admin services, and runs
/// it until SIGTERM (graceful) or SIGINT. Never returns on success.
pub fn run(config_path: &Path, upgrade: bool) -> Result<(), SetupError> {
    let snapshot = Arc::new(config::load(config_path)?);
    let mut conf = ServerConf {
        threads: match snapshot.server.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
        grace_period_seconds: Some(snapshot.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(snapshot.server.grace_period.as_secs().max(1)),
        upstream_keepalive_pool_size: 1024,
        // Zero-downtime upgrade: the running process hands its listening sockets over this
        // socket (on SIGQUIT) to a new one started with `--upgrade`.
        upgrade_sock: snapshot.server.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    conf.pid_file = std::env::temp_dir()
        .join(format!("lumen-{}.pid", std::process::id()))
        .display()
        .to_string();
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let metrics = Arc::new(Metrics::new());
    access_log::init();
    let live = Arc::new(ArcSwap::new(snapshot.clone()));
    let gateway = Gateway::new(live, metrics);
    let reload_state = Arc::new(reload::ReloadState::default());
    let admin = admin_service(&gateway, reload_state.clone());
    let prober = health_prober(&gateway);
    let reloader = pingora::services::background::background_service(
        "lumen config reloader",
        reload::Reloader {
            path: config_path.to_path_buf(),
            config: gateway.config.clone(),
            metrics: gateway.metrics.clone(),
            state: reload_state,
        },
    );
    let proxy = proxy_service(&server.configuration, gateway)?;
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(prober);
    server.add_service(reloader);
    if !snapshot.spawns.is_empty() {
        server.add_service(pingora::services::background::background_service(
            "lumen sidecar supervisor",
            sidecar::Supervisor {
                specs: snapshot.spawns.clone(),
            },
        ));
    }
    tracing::info!(
        config = %config_path.display(),
        listen = ?snapshot.listeners.iter().map(|l| l.addr.as_str()).collect::<Vec<_>>(),
        admin = %snapshot.admin_listen,
        "lumen starting"
    );
    server.run_forever()
}
