//! Hot reload: `SIGHUP` (systemd's `ExecReload`) and changes to the config file, or to a file
//! it names (JWT keys), load the whole file again, validate it, and swap it in with
//! `arc-swap`. Requests in flight finish on the snapshot they started with; a file that does
//! not validate leaves the old snapshot serving and is reported (log, `/admin/config`,
//! `lumen_config_reloads_total{result="error"}`).
//!
//! The watcher polls file metadata (size, mtime, inode) rather than using inotify: it sees
//! editors that write a new file and rename it over the old one, and a burst of writes is
//! loaded once, after the file has been still for a moment.
//!
//! State that must outlive a reload lives outside the snapshot, keyed by stable names: rate
//! limit buckets (key ids), health and circuits (provider and model names), the cache. What a
//! reload cannot change in a running process (listeners, the admin address, Redis, spawned
//! sidecars, worker threads, traces) is logged as needing a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{self, Snapshot};
use crate::metrics::Metrics;
use crate::notify;

/// How often file metadata is checked.
const POLL: Duration = Duration::from_millis(250);
/// A changed file is loaded once it has not changed for this long (editors write in bursts).
const SETTLE: Duration = Duration::from_millis(200);

/// The outcome of the last reload, for `/admin/config`.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub at: SystemTime,
    /// `None`: it succeeded.
    pub error: Option<String>,
    pub trigger: &'static str,
}

/// Shared between the reloader and the admin listener.
#[derive(Default)]
pub struct ReloadState {
    last: Mutex<Option<ReloadStatus>>,
}

impl ReloadState {
    pub fn last(&self) -> Option<ReloadStatus> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    fn set(&self, status: ReloadStatus) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(status);
        }
    }
}

/// The reload background service.
pub struct Reloader {
    pub path: PathBuf,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<ReloadState>,
    /// The address the admin listener is actually bound to (`None`: no admin listener). A
    /// reload cannot move it, so the key rule is checked against it, not the new file's.
    pub admin_bound: Option<String>,
}

/// What identifies a file's version without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(u64, SystemTime, u64)>);

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp(std::fs::metadata(path).ok().map(|m| {
        (
            m.len(),
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.ino(),
        )
    }))
}

impl Reloader {
    /// Tells systemd we are ready once the first proxy listener accepts connections (the
    /// listeners are bound by their own services; readiness must not be claimed before).
    async fn announce_ready(&self) {
        let addr = self.config.load().listeners.first().map(|l| l.addr.clone());
        if let Some(addr) = addr {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while tokio::net::TcpStream::connect(&addr).await.is_err()
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        notify::notify("READY=1");
    }

    fn watched(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        files.extend(self.config.load().watched.iter().cloned());
        files
    }

    /// Loads the file and swaps it in; on failure keeps the old snapshot.
    async fn reload(&self, trigger: &'static str) {
        notify::reloading();
        let path = self.path.clone();
        // File I/O and validation off the async workers.
        let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
        let result = match loaded {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(format!("reload task failed: {e}")),
        }
        .and_then(
            |next| match admin_exposed(self.admin_bound.as_deref(), &next) {
                Some(problem) => Err(format!("{}: {problem}", self.path.display())),
                None => Ok(next),
            },
        );
        match result {
            Ok(next) => {
                let current = self.config.load_full();
                warn_restart_needed(&current, &next);
                let hash = next.source.hash.clone();
                // The outcome is recorded before the swap: whoever sees the new config also
                // sees the reload that brought it.
                self.state.set(ReloadStatus {
                    at: SystemTime::now(),
                    error: None,
                    trigger,
                });
                self.config.store(Arc::new(next));
                notify::notify("READY=1");
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                self.metrics.last_reload.set(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                );
                tracing::info!(trigger, config = %self.path.display(), hash, "config reloaded");
            }
            Err(error) => {
                notify::notify("READY=1");
                self.metrics.reloads.with_label_values(&["error"]).inc();
                // One problem per line in `error`; the log line carries them all (a line break
                // would leave every problem after the first on log lines of their own, which
                // the journal and log searches show apart from this one).
                let problems = error.lines().count();
                tracing::error!(trigger, config = %self.path.display(), problems, error = %error.replace('\n', " | "), "config reload failed; still serving the previous config");
                self.state.set(ReloadStatus {
                    at: SystemTime::now(),
                    error: Some(error),
                    trigger,
                });
            }
        }
    }
}

/// Why `next` must not be swapped in while the admin listener stays bound to `bound`: on an
/// address other hosts can reach, it would answer without a key. Validation only saw the new
/// file's `admin_listen`, which takes effect at the next restart.
fn admin_exposed(bound: Option<&str>, next: &Snapshot) -> Option<String> {
    let bound = bound?;
    let reachable = bound
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|addr| !addr.ip().is_loopback());
    (reachable && next.admin_key.is_none()).then(|| {
        format!(
            "admin_key: the admin listener stays bound to `{bound}` (reachable from other hosts) until a restart, so `admin_key` cannot be removed by a reload; restart to move it to `{}`",
            next.admin_listen
        )
    })
}

/// Logs every setting a reload cannot apply to a running process.
fn warn_restart_needed(current: &Snapshot, next: &Snapshot) {
    let addrs = |s: &Snapshot| {
        s.listeners
            .iter()
            .map(|l| (l.addr.clone(), l.tls.clone(), l.h2c))
            .collect::<Vec<_>>()
    };
    let mut needs = Vec::new();
    if addrs(current) != addrs(next) {
        needs.push("listen");
    }
    if current.admin_listen != next.admin_listen {
        needs.push("admin_listen");
    }
    let redis = |s: &Snapshot| s.redis.as_ref().map(|r| (r.link.clone(), r.prefix.clone()));
    if redis(current) != redis(next) {
        needs.push("redis");
    }
    let spawns = |s: &Snapshot| {
        s.spawns
            .iter()
            .map(|sp| format!("{sp:?}"))
            .collect::<Vec<_>>()
    };
    if spawns(current) != spawns(next) {
        needs.push("providers.*.spawn");
    }
    if current.server.threads != next.server.threads {
        needs.push("server.threads");
    }
    if current.server.runtime != next.server.runtime {
        needs.push("server.runtime");
    }
    if current.cache.memory_bytes != next.cache.memory_bytes {
        needs.push("cache.memory");
    }
    let usage = |s: &Snapshot| {
        (
            s.usage.enabled,
            s.usage.state_dir.clone(),
            s.usage.retention_days,
        )
    };
    if usage(current) != usage(next) {
        needs.push("usage");
    }
    if current.tracing != next.tracing {
        needs.push("tracing");
    }
    if !needs.is_empty() {
        tracing::warn!(settings = ?needs, "these changed settings take effect only after a restart; everything else is live");
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload by editing the file");
                None
            }
        };
        let mut stamps: Vec<(PathBuf, Stamp)> = self
            .watched()
            .into_iter()
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect();
        // A change seen, and when the files were last seen changing.
        let mut pending: Option<std::time::Instant> = None;
        // A stop may come before the listener is up (the wait would then last its whole 30 s
        // and hold the drained node's exit).
        tokio::select! {
            () = self.announce_ready() => {}
            _ = shutdown.changed() => {
                notify::notify("STOPPING=1");
                return;
            }
        }
        // Its own timer, not the file poll's: systemd kills a service whose pings are late.
        let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
        loop {
            tokio::select! {
                _ = async {
                    match watchdog.as_mut() {
                        Some(every) => every.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    notify::notify("WATCHDOG=1");
                }
                _ = shutdown.changed() => {
                    notify::notify("STOPPING=1");
                    return;
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reload("sighup").await;
                    stamps = self.watched().into_iter().map(|p| { let s = stamp(&p); (p, s) }).collect();
                    pending = None;
                }
                _ = tokio::time::sleep(POLL) => {
                    if !self.config.load().server.watch_config {
                        continue;
                    }
                    let now: Vec<(PathBuf, Stamp)> =
                        self.watched().into_iter().map(|p| { let s = stamp(&p); (p, s) }).collect();
                    if now != stamps {
                        stamps = now;
                        pending = Some(std::time::Instant::now());
                    } else if pending.is_some_and(|since| since.elapsed() >= SETTLE) {
                        pending = None;
                        self.reload("file").await;
                        stamps = self.watched().into_iter().map(|p| { let s = stamp(&p); (p, s) }).collect();
                    }
                }
            }
        }
    }
}
