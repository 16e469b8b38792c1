//! The async [`crate::client::Client`] from plain `#[test]` functions and the threads they
//! start (the sidecar's tests are written that way): [`block_on`] runs a request on a runtime
//! this module keeps for the whole test process.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

/// Longest wait for one response, or for one read of a stream. Generous: CI machines have two
/// cores and run other tests beside these.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `future` to completion on the calling thread. One runtime worker drives the sockets of
/// every caller, so connections opened in one call can be read in the next (an SSE stream read
/// event by event) and many threads may wait at once.
pub fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime for blocking tests")
        })
        .block_on(future)
}
