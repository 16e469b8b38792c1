//! systemd's readiness protocol (`Type=notify`): `READY=1` once the listeners answer,
//! `RELOADING=1` / `READY=1` around a reload, `STOPPING=1` on shutdown, and `WATCHDOG=1`
//! keep-alives when the unit sets `WatchdogSec`. Without `NOTIFY_SOCKET` (not under systemd)
//! every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one state message to systemd, if it is listening. Failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket name (Linux).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, state, "could not notify systemd");
    }
}

/// `RELOADING=1` needs the monotonic time it started at (systemd ≥ 253 checks it).
pub fn reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
