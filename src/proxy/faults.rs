//! Test-only fault injection, compiled in but inert unless the process was started with
//! `LUMEN_TEST_FAULTS=1`: lets the integration tests prove that per-request state (circuit
//! trial permits, concurrency slots, token reservations, gauges) is released by guards even
//! when a request's task panics. Never enable it in production.

use std::sync::LazyLock;

/// Read once at start-up.
static ENABLED: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("LUMEN_TEST_FAULTS").is_some_and(|v| v == "1"));

/// The request header that names the point to panic at.
const HEADER: &str = "x-lumen-test-panic";

/// Panics when faults are enabled and the request asks for a panic at `point`.
pub fn maybe_panic(head: &pingora::http::RequestHeader, point: &str) {
    if !*ENABLED {
        return;
    }
    if head
        .headers
        .get(HEADER)
        .is_some_and(|v| v.as_bytes() == point.as_bytes())
    {
        panic!("test fault injected at {point}");
    }
}
