//! Supervises a local `lumen-llama` sidecar for a provider with `spawn:` in its config (the
//! quickstart; on edge hosts systemd runs the sidecar as its own unit instead).
//!
//! The supervisor starts the sidecar on the provider's base URL port, holds the provider back
//! from routing ("starting") until its `/health` answers 200 (its models are loaded), restarts
//! it with capped exponential backoff whenever it exits, and stops it (SIGTERM, then SIGKILL
//! after a grace period) when the gateway shuts down. It runs as a Pingora background service,
//! so it shares the server's lifecycle.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::process::{Child, Command};

/// How to run one sidecar.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The provider this sidecar serves (for logs).
    pub provider: String,
    pub binary: PathBuf,
    pub host: String,
    pub port: u16,
    /// `ALIAS=PATH` for each model.
    pub models: Vec<String>,
    pub args: Vec<String>,
}

impl SpawnSpec {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .arg("--host")
            .arg(&self.host)
            .arg("--port")
            .arg(self.port.to_string());
        for m in &self.models {
            cmd.arg("--model").arg(m);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // A gateway that dies without its graceful shutdown (SIGKILL, a crash) must not leave
        // the sidecar behind holding the port, or the restarted gateway's sidecar cannot bind.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// Shortest and longest wait before restarting a sidecar that exited.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A sidecar that ran this long before dying counts as healthy: the backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// How often a starting sidecar's `/health` is asked, and how long one ask may take.
const READY_POLL: Duration = Duration::from_millis(100);
const READY_ASK: Duration = Duration::from_secs(2);
/// How long a stopping sidecar gets after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The background service that keeps every `spawn:` sidecar running.
pub struct Supervisor {
    pub specs: Vec<SpawnSpec>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Told of each restart, so the provider's circuits reopen at its first healthy probe.
    pub health: std::sync::Arc<crate::upstream::health::HealthTable>,
}

impl Supervisor {
    /// The supervisor of `specs`. Their providers are held back as starting from now, before
    /// the server accepts its first request: none is routed to before its sidecar is ready.
    pub fn new(
        specs: Vec<SpawnSpec>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        health: std::sync::Arc<crate::upstream::health::HealthTable>,
    ) -> Supervisor {
        for spec in &specs {
            health.get(&spec.provider).set_starting(true);
        }
        Supervisor {
            specs,
            metrics,
            health,
        }
    }
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, shutdown: ShutdownWatch) {
        let tasks: Vec<_> = self
            .specs
            .iter()
            .cloned()
            .map(|spec| {
                tokio::spawn(supervise(
                    spec,
                    shutdown.clone(),
                    self.metrics.clone(),
                    self.health.clone(),
                ))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn supervise(
    spec: SpawnSpec,
    mut shutdown: ShutdownWatch,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    health: std::sync::Arc<crate::upstream::health::HealthTable>,
) {
    let up = metrics.sidecar_up.with_label_values(&[&spec.provider]);
    let restarts = metrics
        .sidecar_restarts
        .with_label_values(&[&spec.provider]);
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        let first_start = std::mem::take(&mut first);
        if !first_start {
            restarts.inc();
        }
        if *shutdown.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        let mut child = match spec.command().spawn() {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(provider = %spec.provider, binary = %spec.binary.display(), error = %e,
                    "cannot start the lumen-llama sidecar (is it built? cargo build --release -p lumen-llama)");
                if wait_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(provider = %spec.provider, pid = child.id().unwrap_or(0), port = spec.port, "sidecar started");
        up.set(1);
        // Not routed to until it has loaded its models: requests meanwhile go to the route's
        // other targets, or get a 503 with Retry-After, instead of failing on a refused
        // connection and opening its circuits.
        let state = health.get(&spec.provider);
        state.set_starting(true);
        let ready = wait_ready(&spec.host, spec.port);
        tokio::pin!(ready);
        let mut starting = true;
        let status = loop {
            tokio::select! {
                () = &mut ready, if starting => {
                    starting = false;
                    state.set_starting(false);
                    tracing::info!(provider = %spec.provider, ready_ms = started.elapsed().as_millis() as u64, "sidecar ready");
                    // What probes saw while it loaded (503s) is stale: forgotten, so it is
                    // routed to at once, and probed at once (whose first healthy answer
                    // half-opens the circuits a death opened).
                    state.clear_probe();
                    state.mark_restarted();
                }
                status = child.wait() => break status,
                _ = shutdown.changed() => {
                    stop(&mut child, &spec).await;
                    up.set(0);
                    state.set_starting(false);
                    return;
                }
            }
        };
        up.set(0);
        let ran = started.elapsed();
        if ran > STABLE_AFTER {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(provider = %spec.provider, status = ?status.ok(), ran_s = ran.as_secs(),
            retry_in_ms = backoff.as_millis() as u64, "sidecar exited; restarting");
        if wait_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Returns once the sidecar on `host:port` answers `GET /health` with 200 (it answers 503
/// while it loads its models); the caller races this against the child's exit.
async fn wait_ready(host: &str, port: u16) {
    while !tokio::time::timeout(READY_ASK, health_ok(host, port))
        .await
        .unwrap_or(false)
    {
        tokio::time::sleep(READY_POLL).await;
    }
}

/// One `GET /health`: whether it answered 200.
async fn health_ok(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect((host, port)).await else {
        return false;
    };
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let ask = format!("GET /health HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
    if stream.write_all(ask.as_bytes()).await.is_err() {
        return false;
    }
    // The status line's first 12 bytes: "HTTP/1.1 200".
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).await.is_ok() && status.ends_with(b" 200")
}

/// Sleeps `d`; `true` if shutdown began meanwhile.
async fn wait_or_shutdown(d: Duration, shutdown: &mut ShutdownWatch) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

async fn stop(child: &mut Child, spec: &SpawnSpec) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SIGTERM first so the sidecar can finish what it is writing.
        // SAFETY: kill(2) on a child we spawned and have not reaped; no memory is touched.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    tracing::info!(provider = %spec.provider, "sidecar stopped");
}
