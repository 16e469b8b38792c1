//! Lumen: an OpenAI-compatible LLM gateway for the edge, built on Pingora.
//!
//! The crate is the gateway as a library, so an operator with their own Pingora server can
//! mount it as one more service ([`proxy_service`], [`admin_service`]); the `lumen` binary is a
//! thin CLI over [`run`].
//!
//! The layers, top down; each imports only the layers below it (no import cycle between files:
//! `scripts/import-cycles` checks it):
//!
//! | module | what it does |
//! |---|---|
//! | [`node`] | the composition root: the Redis link first, then health, quotas, cache, ledger, jobs |
//! | [`proxy`] | Lumen's HTTP service ([`proxy::Proxy`]): DESIGN.md's request pipeline, one file per concern |
//! | [`admin`] | the admin listener (`/metrics`, `/admin/*`, console, OpenAPI) and its CLI |
//! | [`jobs`] | async jobs: the queue, workers (run through the pipeline), the HTTP shapes |
//! | [`ledger`] | usage accounting per key, provider, model and day (file or Redis) |
//! | [`routing`] | model name → route → targets, and their order for one request (`balance`) |
//! | [`config`] | YAML → validated, immutable [`config::Snapshot`]; hot reload |
//! | [`upstream`] | one provider: its definition, health, quotas, DNS, retries, sidecar supervisor |
//! | [`ops`] | `/healthz`, `/readyz`, `/v1/models` |
//! | [`openai`] | endpoints, the few body fields routing needs, and request errors |
//! | [`translate`] | other API families (Responses) to and from chat completions, the hub |
//! | [`error`] | every failure and its one mapping to status + OpenAI error body |
//! | [`conn`] | client connections: request-head and keep-alive timeouts, the connection cap |
//! | [`session`] | the client's side of one request (Pingora's `ServerSession`, shaped for the pipeline) |
//! | [`background`] | background services on one thread each, the deferrable ones niced |
//! | [`drain`] | graceful shutdown: open streams ended cleanly, the last usage flush |
//! | [`notify`] | systemd readiness (`Type=notify`): ready, reloading, stopping, watchdog |
//! | [`access_log`] | one JSON line per request, written off the request path |
//! | [`metrics`] | the Prometheus registry |
//!
//! Edge policies (auth, rate limits, cache, CORS, the SSE codec) live in the `lumen-plugins`
//! crate, as plain Rust with no Pingora types.

pub mod access_log;
pub mod admin;
pub mod background;
pub mod batches;
pub mod config;
pub mod conn;
pub mod drain;
pub mod error;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod openai;
pub mod ops;
pub mod price;
pub mod proxy;
pub mod routing;
pub mod session;
pub mod spread;
pub mod stored;
pub mod telemetry;
pub mod translate;
pub mod upstream;
pub use lumen_plugins::sse::usage;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;

pub use config::raw::RuntimeModel;
pub use config::Snapshot;
pub use metrics::Metrics;
pub use node::Node;
pub use proxy::Gateway;

// Paths from before the source reshape (issue 17), kept so code written against them builds.
#[doc(hidden)]
pub use admin::cli as admin_cli;
#[doc(hidden)]
pub use config::reload;
#[doc(hidden)]
pub use proxy as pipeline;
#[doc(hidden)]
pub use proxy::{cache, ctx, faults, forward};
#[doc(hidden)]
pub use routing::balance;
#[doc(hidden)]
pub use upstream::supervisor as sidecar;
#[doc(hidden)]
pub use upstream::{health, resolve, retry};

/// Errors from building the gateway's services.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("listener {addr}: {reason}")]
    Listener { addr: String, reason: String },
    #[error("{0}")]
    Worker(String),
}

/// The proxy service on the snapshot's listeners, ready to add to a Pingora `Server`.
pub fn proxy_service(gateway: Gateway) -> Result<Service<conn::Guarded<proxy::Proxy>>, SetupError> {
    let snapshot = gateway.config.load_full();
    let h2c = plaintext_h2c(&snapshot);
    let mut service = guarded_proxy(gateway, h2c);
    add_listeners(&mut service, &snapshot)?;
    Ok(service)
}

/// `server.runtime: per_core`: `threads` proxy services of one thread each on the same
/// listening sockets (Pingora's listener table hands every service the socket the first one
/// bound). Each has an upstream pool of its own ([`Gateway::sibling`]); they share the node,
/// the limits and one `server.max_connections` count. Whichever thread wakes first accepts
/// what is queued, so a thread ahead of the others hands new connections over
/// ([`spread`]). Add them all to one `Server`; the first also takes any other endpoint the
/// caller adds (`add_uds`).
pub fn per_core_proxy_services(
    gateway: Gateway,
    threads: usize,
) -> Result<Vec<spread::CoreService<Service<conn::Guarded<proxy::Proxy>>>>, SetupError> {
    let threads = threads.max(1);
    let snapshot = gateway.config.load_full();
    let h2c = plaintext_h2c(&snapshot);
    let limits = snapshot.server.connections;
    let spread = Arc::new(spread::Spread::new(
        threads,
        &gateway.metrics.connections_open,
    ));
    let mut gateways = Vec::with_capacity(threads);
    for _ in 1..threads {
        gateways.push(gateway.sibling());
    }
    gateways.insert(0, gateway);
    let apps = gateways.into_iter().map(|g| http_proxy(g, h2c)).collect();
    let mut services = Vec::with_capacity(threads);
    for (i, app) in conn::Guarded::per_core(apps, limits, &spread)
        .into_iter()
        .enumerate()
    {
        let name = match i {
            0 => "lumen proxy".to_string(),
            i => format!("lumen proxy {}", i + 1),
        };
        let mut service = Service::new(name, app);
        service.threads = Some(1);
        add_listeners(&mut service, &snapshot)?;
        services.push(spread::CoreService::new(service, spread.clone(), i));
    }
    Ok(services)
}

/// Whether cleartext HTTP/2 is taken on the plaintext listeners.
fn plaintext_h2c(snapshot: &Snapshot) -> bool {
    let h2c = snapshot.listeners.iter().any(|l| l.tls.is_none() && l.h2c);
    if h2c && snapshot.listeners.iter().any(|l| l.tls.is_none() && !l.h2c) {
        // Pingora takes h2c per service, not per listener. Two services would mean two
        // gateways (two limiters, caches, pools); instead say what happens: HTTP/1 clients
        // are unaffected, and a client that opens with the HTTP/2 preface gets HTTP/2.
        tracing::warn!("`h2c: true` on one plaintext listener accepts cleartext HTTP/2 on every plaintext listener");
    }
    h2c
}

/// The snapshot's listeners, added to `service`.
fn add_listeners<A>(service: &mut Service<A>, snapshot: &Snapshot) -> Result<(), SetupError> {
    for listener in &snapshot.listeners {
        match &listener.tls {
            None => service.add_tcp(&listener.addr),
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
    Ok(())
}

/// The proxy app behind the connection limits of `server:`, with no listener yet.
fn guarded_proxy(gateway: Gateway, h2c: bool) -> Service<conn::Guarded<proxy::Proxy>> {
    let limits = gateway.config.load().server.connections;
    let proxy = http_proxy(gateway, h2c);
    Service::new("lumen proxy".to_string(), conn::Guarded::new(proxy, limits))
}

/// Lumen's HTTP service around `gateway`.
fn http_proxy(gateway: Gateway, h2c: bool) -> proxy::Proxy {
    let limits = gateway.config.load().server.connections;
    proxy::Proxy::new(gateway, server_options(limits, h2c))
}

/// Pingora's options for a listening service: HTTP/2 idle connections close after the same
/// `keepalive_timeout` as HTTP/1 ones (which [`conn`] enforces).
fn server_options(limits: conn::ConnLimits, h2c: bool) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h2c = h2c;
    options.h2_idle_timeout = Some(limits.keepalive_timeout);
    options
}

/// The admin service (`/metrics`, `/admin/*`, `/openapi.json`, `/ui`, `/docs`) on the
/// snapshot's admin address. `history` is what [`traffic_sampler`] fills for the console.
/// `node` is the [`Node`] (or a [`Gateway`], which serves one).
pub fn admin_service(
    node: &impl AsRef<Node>,
    reload: Arc<config::reload::ReloadState>,
    history: Arc<admin::History>,
) -> impl pingora::services::ServiceWithDependents {
    let node = node.as_ref();
    let snapshot = node.config.load_full();
    let mut app = pingora::apps::http_app::HttpServer::new_app(admin::AdminApp {
        metrics: node.metrics.clone(),
        config: node.config.clone(),
        health: node.health.clone(),
        reload,
        ledger: node.ledger.clone(),
        history,
        budgets: node.budgets.clone(),
        shared_budgets: node.redis.as_ref().map(|r| r.budgets.clone()),
        redis: node.redis.as_ref().map(|r| r.link.clone()),
    });
    let limits = snapshot.server.connections;
    app.server_options = Some(server_options(limits, false));
    let mut service = Service::new("lumen admin".to_string(), conn::Guarded::new(app, limits));
    // Scrapes and the console: one thread is plenty, and leaves the cores to the proxy.
    service.threads = Some(1);
    service.add_tcp(&snapshot.admin_listen);
    service
}

/// The background service that keeps the last minutes of traffic for `/admin/timeseries`.
pub fn traffic_sampler(
    node: &impl AsRef<Node>,
    history: Arc<admin::History>,
) -> impl pingora::services::ServiceWithDependents {
    background::service(
        "lumen traffic sampler",
        background::Priority::Deferrable,
        admin::Sampler {
            history,
            metrics: node.as_ref().metrics.clone(),
        },
    )
}

/// The background service that probes every provider of the live config (and Redis).
pub fn health_prober(node: &impl AsRef<Node>) -> impl pingora::services::ServiceWithDependents {
    let node = node.as_ref();
    background::service(
        "lumen health prober",
        background::Priority::Timely,
        upstream::health::probe::Prober {
            providers: node.config.clone(),
            health: node.health.clone(),
            metrics: node.metrics.clone(),
            redis: node.redis.as_ref().map(|r| r.link.clone()),
        },
    )
}

/// The background service that writes usage out periodically and on shutdown.
pub fn usage_flusher(node: &impl AsRef<Node>) -> impl pingora::services::ServiceWithDependents {
    background::service(
        "lumen usage flusher",
        background::Priority::Deferrable,
        usage_flush(node.as_ref()),
    )
}

fn usage_flush(node: &Node) -> ledger::Flusher {
    ledger::Flusher {
        ledger: node.ledger.clone(),
        config: node.config.clone(),
        metrics: node.metrics.clone(),
    }
}

/// A background service the node's early exit waits for at shutdown (`drain::Held`).
fn held<S>(
    name: &str,
    priority: background::Priority,
    inner: S,
    drain: &Arc<drain::Drain>,
) -> pingora::services::background::GenBackgroundService<background::Niced<drain::Held<S>>>
where
    S: pingora::services::background::BackgroundService + Send + Sync + 'static,
{
    background::service(
        name,
        priority,
        drain::Held {
            inner,
            drain: drain.clone(),
        },
    )
}

/// Loads `config_path`, builds the Pingora server with the proxy and admin services, and runs
/// it until SIGTERM (graceful) or SIGINT. Never returns on success.
pub fn run(config_path: &Path, upgrade: bool) -> Result<(), SetupError> {
    run_node(config_path, upgrade, false)
}

/// Runs async-job workers only (`lumen worker`): the config's jobs are taken from Redis, run
/// through this process's own pipeline (on its internal socket), and no port is opened.
pub fn run_worker(config_path: &Path) -> Result<(), SetupError> {
    run_node(config_path, false, true)
}

fn run_node(config_path: &Path, upgrade: bool, worker_only: bool) -> Result<(), SetupError> {
    let snapshot = Arc::new(config::load(config_path)?);
    if worker_only && snapshot.redis.is_none() {
        return Err(SetupError::Worker(
            "`lumen worker` takes jobs from the fleet's Redis queue: set `redis:` in the config"
                .into(),
        ));
    }
    if worker_only && snapshot.jobs.workers == 0 {
        return Err(SetupError::Worker(
            "`lumen worker` with `jobs.workers: 0` would do nothing".into(),
        ));
    }
    let threads = match snapshot.server.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let runtime = snapshot.server.runtime;
    let mut conf = ServerConf {
        threads,
        // per_core: each proxy service has one thread, and a one-thread runtime without work
        // stealing is a plain single-threaded Tokio runtime (no shared run queue to lock).
        work_stealing: runtime == RuntimeModel::WorkStealing,
        grace_period_seconds: Some(snapshot.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(snapshot.server.grace_period.as_secs().max(1)),
        upstream_keepalive_pool_size: 1024,
        // Pingora bounds reads and writes with its "fast" timer below this many seconds (60 by
        // default): a thread that wakes every millisecond for the life of the process and takes
        // every thread's timer lock on each tick (2.3% of the gateway's CPU at c=32, and a
        // thousand wake-ups a second on an idle edge host). Timeouts of a second and more (all
        // of Lumen's) go to Tokio's timer instead, which each runtime keeps to itself and which
        // only wakes when a timer is due.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
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
    // The composition root: Redis, health, quotas, cache, ledger and jobs, built once. The
    // proxy and every service below are built from it.
    let node = Arc::new(Node::new(live, metrics));
    let reload_state = Arc::new(config::reload::ReloadState::default());
    let history = Arc::new(admin::History::default());
    let gateway = Gateway::on(node.clone());
    // Workers send jobs through the proxy over this socket (owner-only; one per process).
    let socket = jobs::run::socket_path();
    let _ = std::fs::remove_file(&socket);
    let internal = |service: &mut Service<conn::Guarded<proxy::Proxy>>| {
        service.add_uds(
            &socket.to_string_lossy(),
            Some(std::os::unix::fs::PermissionsExt::from_mode(0o600)),
        )
    };
    if worker_only || runtime != RuntimeModel::PerCore {
        // A worker has no listeners but the internal socket.
        let mut proxy = if worker_only {
            guarded_proxy(gateway, false)
        } else {
            proxy_service(gateway)?
        };
        internal(&mut proxy);
        server.add_service(proxy);
    } else {
        let mut proxies = per_core_proxy_services(gateway, threads)?;
        if let Some(first) = proxies.first_mut() {
            internal(&mut first.service);
        }
        for proxy in proxies {
            server.add_service(proxy);
        }
    }
    server.add_service(held(
        "lumen jobs socket cleanup",
        background::Priority::Deferrable,
        jobs::run::SocketFile {
            path: socket.clone(),
        },
        &node.drain,
    ));
    if node.jobs.settings.workers > 0 {
        server.add_service(held(
            "lumen job workers",
            background::Priority::Deferrable,
            jobs::run::Workers {
                jobs: node.jobs.clone(),
                socket,
                config: node.config.clone(),
            },
            &node.drain,
        ));
    }
    // Every node drives batches: the ones made here, or (Redis) the ones whose lease it holds.
    server.add_service(held(
        "lumen batch driver",
        background::Priority::Deferrable,
        batches::drive::Driver {
            batches: node.batches.clone(),
            config: node.config.clone(),
        },
        &node.drain,
    ));
    if !worker_only {
        server.add_service(admin_service(&node, reload_state.clone(), history.clone()));
        server.add_service(traffic_sampler(&node, history));
    }
    server.add_service(health_prober(&node));
    // Not held: it keeps flushing through the grace period; the drainer flushes last.
    server.add_service(usage_flusher(&node));
    // Held: it announces STOPPING=1 to systemd before the node may exit.
    server.add_service(held(
        "lumen config reloader",
        background::Priority::Timely,
        config::reload::Reloader {
            path: config_path.to_path_buf(),
            config: node.config.clone(),
            metrics: node.metrics.clone(),
            state: reload_state,
            admin_bound: (!worker_only).then(|| snapshot.admin_listen.clone()),
        },
        &node.drain,
    ));
    // Sidecars belong to serving nodes; a worker uses the providers as configured.
    if !snapshot.spawns.is_empty() && !worker_only {
        server.add_service(held(
            "lumen sidecar supervisor",
            background::Priority::Timely,
            upstream::supervisor::Supervisor::new(
                snapshot.spawns.clone(),
                node.metrics.clone(),
                node.health.clone(),
            ),
            &node.drain,
        ));
    }
    server.add_service(background::service(
        "lumen drain",
        background::Priority::Timely,
        drain::Drainer {
            drain: node.drain.clone(),
            ledger: node.ledger.clone(),
            telemetry: node.telemetry.clone(),
            in_flight: node.metrics.in_flight.clone(),
            // Pingora's grace period is whole seconds: the drain's clock is the same one.
            grace_period: std::time::Duration::from_secs(snapshot.server.grace_period.as_secs()),
        },
    ));
    for warning in snapshot.auth.warnings() {
        tracing::warn!("{warning}");
    }
    for warning in snapshot.unpriced() {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        config = %config_path.display(),
        listen = ?snapshot.listeners.iter().map(|l| l.addr.as_str()).collect::<Vec<_>>(),
        admin = %snapshot.admin_listen,
        "lumen starting"
    );
    server.run_forever()
}
