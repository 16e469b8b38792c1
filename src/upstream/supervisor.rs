//! Supervises a local `lumen-llama` sidecar for a provider with `spawn:` in its config (the
//! quickstart; on edge hosts systemd runs the sidecar as its own unit instead).
//!
//! The supervisor starts the sidecar on the provider's base URL port, waits for its `/health`
//! to answer 200, restarts it with capped exponential backoff whenever it exits, and stops it
//! (SIGTERM, then SIGKILL after a grace period) when the gateway shuts down. It runs as a
//! Pingora background service, so it shares the server's lifecycle.

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
/// How long a stopping sidecar gets after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The background service that keeps every `spawn:` sidecar running.
pub struct Supervisor {
    pub specs: Vec<SpawnSpec>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Told of each restart, so the provider's circuits reopen at its first healthy probe.
    pub health: std::sync::Arc<crate::upstream::health::HealthTable>,
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
        if !first_start {
            health.get(&spec.provider).mark_restarted();
        }
        tokio::select! {
            status = child.wait() => {
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
            _ = shutdown.changed() => {
                stop(&mut child, &spec).await;
                up.set(0);
                return;
            }
        }
    }
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
