//! Background services (prober, reloader, flusher, sampler, job workers, supervisor, drainer):
//! each on one thread of its own (Pingora's default for them), and the deferrable ones at a
//! lower CPU priority than the proxy's threads.
//!
//! Under load, work that can wait must not take CPU from requests, so a [`Deferrable`]
//! service's thread runs [`NICE`] steps nicer than the process: the kernel then gives it
//! about a tenth of a proxy thread's share when both want the core, and all it asks for when
//! nothing else does. What it does stays correct at any speed; only its latency moves.
//!
//! Services whose timing is their point stay [`Timely`], at the proxy's priority: the health
//! prober (a probe answered late by a starved prober would mark a healthy provider down and
//! turn traffic away), the reloader (it sends systemd's watchdog pings: late ones get the
//! process killed), the sidecar supervisor and the drainer. They use little CPU anyway.
//!
//! [`Deferrable`]: Priority::Deferrable
//! [`Timely`]: Priority::Timely

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::{BackgroundService, GenBackgroundService};

/// How much nicer a deferrable service's thread is than the process (the proxy's threads).
pub const NICE: i32 = 10;

/// Whether a background service's timing matters (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// At the proxy's priority: its timing affects routing, systemd or shutdown.
    Timely,
    /// Niced by [`NICE`]: work that can wait (usage flushes, traffic samples, async jobs).
    Deferrable,
}

/// `inner` as a Pingora service with one thread, at `priority`.
pub fn service<S>(name: &str, priority: Priority, inner: S) -> GenBackgroundService<Niced<S>>
where
    S: BackgroundService + Send + Sync + 'static,
{
    let mut service = GenBackgroundService::new(
        name.to_string(),
        std::sync::Arc::new(Niced { inner, priority }),
    );
    service.threads = Some(1);
    service
}

/// A background service whose runtime thread is niced first when it is
/// [`Priority::Deferrable`].
pub struct Niced<S> {
    pub inner: S,
    pub priority: Priority,
}

#[async_trait]
impl<S: BackgroundService + Send + Sync> BackgroundService for Niced<S> {
    async fn start(&self, shutdown: ShutdownWatch) {
        // The service's runtime has one thread (see `service`) and this task runs on it, so
        // this thread is the one to lower. Best effort: a failure leaves it at the default.
        if self.priority == Priority::Deferrable {
            if let Err(e) = renice_this_thread(NICE) {
                tracing::debug!(error = %e, "could not lower a background thread's priority");
            }
        }
        self.inner.start(shutdown).await;
    }
}

/// Makes the calling thread `by` steps nicer, at most 19 (Linux: `setpriority` on a thread id
/// is per thread). Raising niceness needs no privilege.
pub fn renice_this_thread(by: i32) -> std::io::Result<()> {
    let nice = thread_nice()?.saturating_add(by).min(19);
    // SAFETY: plain syscalls on the calling thread's own id.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// This thread's niceness.
pub fn thread_nice() -> std::io::Result<i32> {
    // SAFETY: as above. getpriority can return -1 legitimately; errno tells.
    unsafe {
        *libc::__errno_location() = 0;
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        let err = std::io::Error::last_os_error();
        if nice == -1 && err.raw_os_error() != Some(0) {
            return Err(err);
        }
        Ok(nice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raising niceness needs no privilege, and touches only the calling thread.
    #[test]
    fn renice_applies_to_the_calling_thread_only() {
        let before = thread_nice().unwrap();
        let niced = std::thread::spawn(|| {
            renice_this_thread(NICE).unwrap();
            thread_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(niced, (before + NICE).min(19));
        assert_eq!(
            thread_nice().unwrap(),
            before,
            "the test's own thread is untouched"
        );
    }

    /// The service wrapper gives one thread, lowered before the inner service runs when the
    /// service is deferrable, left alone when it is timely.
    #[test]
    fn service_runs_inner_at_its_priority() {
        struct Probe(std::sync::Mutex<Option<i32>>);
        #[async_trait]
        impl BackgroundService for Probe {
            async fn start(&self, _shutdown: ShutdownWatch) {
                *self.0.lock().unwrap() = Some(thread_nice().unwrap());
            }
        }
        let before = thread_nice().unwrap();
        for (priority, expected) in [
            (Priority::Deferrable, (before + NICE).min(19)),
            (Priority::Timely, before),
        ] {
            let service = service("probe", priority, Probe(std::sync::Mutex::new(None)));
            assert_eq!(service.threads, Some(1));
            let task = service.task();
            let (_tx, rx) = tokio::sync::watch::channel(false);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(task.start(rx))
            })
            .join()
            .unwrap();
            let seen = service.task().inner.0.lock().unwrap().unwrap();
            assert_eq!(seen, expected, "{priority:?}");
        }
    }
}
