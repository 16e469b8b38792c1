//! Test-only fault injection, compiled in but inert unless the process was started with
//! `LUMEN_TEST_FAULTS=1`: lets the integration tests prove that per-request state (circuit
//! trial permits, concurrency slots, token reservations, gauges) is released by guards even
//! when a request's task panics, and hold a request at a point to widen a race. Never enable
//! it in production.

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

/// The request header that names the point to pause at.
const PAUSE_HEADER: &str = "x-lumen-test-pause";

/// How long [`maybe_pause`] holds a request.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// Holds the request for [`PAUSE`] when faults are enabled and it asks for a pause at `point`:
/// what the request still holds there (a cache flight, a slot) stays held that long.
pub async fn maybe_pause(head: &pingora::http::RequestHeader, point: &str) {
    if !*ENABLED {
        return;
    }
    if head
        .headers
        .get(PAUSE_HEADER)
        .is_some_and(|v| v.as_bytes() == point.as_bytes())
    {
        tokio::time::sleep(PAUSE).await;
    }
}
