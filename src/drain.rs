//! Graceful shutdown of a serving node: what happens between SIGTERM and the exit.
//!
//! Pingora stops accepting on SIGTERM, then sleeps the whole `grace_period` before it stops
//! its runtimes, cutting whatever still runs. For an LLM gateway that is wrong twice: a stream
//! longer than the grace period was cut silently (no error event, no chunked terminator), and
//! an idle node still waited the whole period. The [`Drainer`] service fixes both:
//! - shortly before the grace period ends it tells every open stream to stop
//!   ([`Drain::cut`]): each ends with an SSE error event (`server_shutting_down`) and a clean
//!   end, so clients know to retry;
//! - as soon as no request is in flight, no accepted connection is still to send its first
//!   request, and the services that finish work at shutdown (job
//!   workers, sidecar stop, socket clean-up: wrapped in [`Held`]) are done, it writes the usage
//!   ledger out one last time and the process exits, without waiting out the grace period;
//! - and if something still holds it (a request that outlives the cut, a connection that
//!   never sends its first request), it stops waiting just before Pingora would stop the
//!   runtimes, and writes the ledger out all the same: usage is never lost to the clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

/// Shared by the proxy (streams wait on [`Drain::cut`]) and the shutdown services.
pub struct Drain {
    /// `true` once open streams must end.
    cut: watch::Sender<bool>,
    /// Services still finishing their shutdown work.
    holds: AtomicUsize,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            cut: watch::Sender::new(false),
            holds: AtomicUsize::new(0),
        }
    }
}

impl Drain {
    /// Resolves when open streams must end (never, until shutdown nears its deadline).
    pub async fn cut(&self) {
        let mut rx = self.cut.subscribe();
        // An error means the sender is gone, which only happens at exit: stop waiting too.
        let _ = rx.wait_for(|cut| *cut).await;
    }

    /// Whether streams have been told to end.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    fn hold(self: &Arc<Self>) -> HoldGuard {
        self.holds.fetch_add(1, Ordering::AcqRel);
        HoldGuard(self.clone())
    }
}

/// One service's shutdown work in progress; released when the service returns.
struct HoldGuard(Arc<Drain>);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A background service the exit waits for: its `start` returning means its shutdown work
/// (a final flush, a stopped child) is done.
pub struct Held<S> {
    pub inner: S,
    pub drain: Arc<Drain>,
}

#[async_trait]
impl<S: BackgroundService + Send + Sync> BackgroundService for Held<S> {
    async fn start(&self, shutdown: ShutdownWatch) {
        let _hold = self.drain.hold();
        self.inner.start(shutdown).await;
    }
}

/// Run just before a drained process exits (the binary flushes its log writer here).
static EXIT_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what runs just before a drained process exits; the first call wins.
pub fn set_exit_hook(hook: fn()) {
    let _ = EXIT_HOOK.set(hook);
}

/// How often the drainer looks at what is still running.
const POLL: Duration = Duration::from_millis(25);

/// The shutdown service of a serving node.
pub struct Drainer {
    pub drain: Arc<Drain>,
    /// Written out last, after the last request was counted.
    pub ledger: Arc<crate::ledger::Ledger>,
    /// Its last spans are sent before the exit (within the export timeout).
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// `lumen_requests_in_flight`: client requests and job requests alike.
    pub in_flight: prometheus::IntGauge,
    pub grace_period: Duration,
}

/// How long before the grace period ends the drain starts to wrap up: a tenth of it, at most
/// a second.
fn margin(grace_period: Duration) -> Duration {
    (grace_period / 10).min(Duration::from_secs(1))
}

/// When streams are cut: a margin before the grace period ends, so their error events go out
/// before Pingora stops the runtimes.
fn cut_after(grace_period: Duration) -> Duration {
    grace_period.saturating_sub(margin(grace_period))
}

/// When the drain stops waiting and exits anyway: half the margin after the cut, leaving the
/// other half for the ledger's last write (Pingora cancels every task when the period ends).
fn give_up_after(grace_period: Duration) -> Duration {
    grace_period.saturating_sub(margin(grace_period) / 2)
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        tracing::info!(grace_period_s = self.grace_period.as_secs_f64(), "draining");
        let started = tokio::time::Instant::now();
        let (cut_at, give_up_at) = (
            started + cut_after(self.grace_period),
            started + give_up_after(self.grace_period),
        );
        loop {
            let now = tokio::time::Instant::now();
            if !self.drain.is_cut() && now >= cut_at {
                tracing::warn!(
                    in_flight = self.in_flight.get(),
                    "grace period ending: open streams end with server_shutting_down"
                );
                self.drain.cut.send_replace(true);
            }
            // A connection accepted before the listener stopped (or was handed to a new
            // process) whose request has not arrived yet is waited for as well, until its
            // request is in flight or the connection ends (the head timeout bounds it). Read
            // first: a request leaves that count only once it is counted in flight.
            let unserved = crate::conn::unserved_connections();
            let drained = unserved == 0
                && self.in_flight.get() <= 0
                && self.drain.holds.load(Ordering::Acquire) == 0;
            if !drained && now < give_up_at {
                tokio::time::sleep(POLL).await;
                continue;
            }
            if drained {
                tracing::info!("drained: no request in flight; exiting");
            } else {
                tracing::warn!(
                    in_flight = self.in_flight.get(),
                    unserved_connections = unserved,
                    shutdown_work = self.drain.holds.load(Ordering::Acquire),
                    "grace period over: exiting with work still open"
                );
            }
            self.ledger.shutdown().await;
            if let Some(telemetry) = self.telemetry.clone() {
                let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            }
            crate::access_log::flush(Duration::from_millis(500));
            if let Some(hook) = EXIT_HOOK.get() {
                hook();
            }
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_cut_just_before_the_grace_period_ends() {
        assert_eq!(cut_after(Duration::from_secs(30)), Duration::from_secs(29));
        assert_eq!(
            cut_after(Duration::from_secs(5)),
            Duration::from_millis(4500)
        );
        assert_eq!(cut_after(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_drain_gives_up_between_the_cut_and_the_end_of_the_grace_period() {
        assert_eq!(
            give_up_after(Duration::from_secs(30)),
            Duration::from_millis(29_500)
        );
        assert_eq!(
            give_up_after(Duration::from_secs(1)),
            Duration::from_millis(950)
        );
        assert_eq!(give_up_after(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn cut_wakes_every_waiter() {
        let drain = Arc::new(Drain::default());
        let waiter = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.cut().await })
        };
        assert!(!drain.is_cut());
        drain.cut.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
        drain.cut().await;
    }

    #[test]
    fn holds_are_released_on_drop() {
        let drain = Arc::new(Drain::default());
        let hold = drain.hold();
        assert_eq!(drain.holds.load(Ordering::Acquire), 1);
        drop(hold);
        assert_eq!(drain.holds.load(Ordering::Acquire), 0);
    }
}
