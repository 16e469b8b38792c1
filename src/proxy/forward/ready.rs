//! Polling a future once, without waiting: used where a read that is not ready yet should be
//! dropped and made again later rather than awaited.

/// The output of `future` if it is ready without waiting. Reading the provider's body is
/// cancel-safe (`answer.rs`: nothing is consumed from the socket until a read completes), so
/// a read that is not ready is dropped and made again later.
pub(super) fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}
