//! What a route does when an attempt fails: which failures are retried, how many attempts in
//! all, how long to back off, and the deadline after which the client gets the last error.
//!
//! Falling back to a target not yet tried happens at once; backoff (exponential, full jitter)
//! applies only before trying a target again, because a different provider's health owes
//! nothing to the one that just failed.

use std::time::Duration;

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, DNS, TLS): the provider never saw the request.
    Connect,
    /// No response head or no first chunk in time, or the route's deadline hit.
    Timeout,
    /// The connection closed before the first byte reached the client.
    Dropped,
    /// The provider answered with this status.
    Status(u16),
}

impl Failure {
    /// A bounded metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Dropped => "dropped",
            Failure::Status(429) => "status_429",
            Failure::Status(s) if s >= 500 => "status_5xx",
            Failure::Status(_) => "status_4xx",
        }
    }

    /// Whether this failure counts against the provider's health (a 4xx other than 429 is
    /// the client's fault, not the provider's).
    pub fn is_provider_fault(self) -> bool {
        match self {
            Failure::Status(s) => s == 429 || s >= 500,
            _ => true,
        }
    }
}

/// A route's retry policy, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub connect: bool,
    pub timeout: bool,
    pub dropped: bool,
    pub status_429: bool,
    pub status_5xx: bool,
    /// Individual statuses listed in `on:`.
    pub statuses: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub deadline: Option<Duration>,
}

/// The most attempts a route may configure: beyond this a retry storm is likelier than help.
pub const MAX_ATTEMPTS: u32 = 10;

impl RetryPolicy {
    /// The policy of a route with no `retry:`.
    pub fn default_for(targets: usize) -> RetryPolicy {
        RetryPolicy {
            attempts: (targets as u32).clamp(1, MAX_ATTEMPTS - 1) + 1,
            connect: true,
            timeout: true,
            dropped: true,
            status_429: true,
            status_5xx: true,
            statuses: Vec::new(),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            deadline: None,
        }
    }

    /// Whether `failure` is tried again (on another target, or this one after backoff).
    pub fn retries(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect => self.connect,
            Failure::Timeout => self.timeout,
            Failure::Dropped => self.dropped,
            Failure::Status(s) => {
                self.statuses.contains(&s)
                    || (s == 429 && self.status_429)
                    || (s >= 500 && self.status_5xx)
            }
        }
    }

    /// The pause before trying a target for the `n`th time (n ≥ 1): uniformly random up to
    /// `min(max, base × 2^(n-1))` ("full jitter": retries from many clients spread out).
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16));
        let cap = exp.min(self.backoff_max);
        cap.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn backoff_is_jittered_below_an_exponential_cap() {
        let p = RetryPolicy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            ..RetryPolicy::default_for(1)
        };
        for _ in 0..200 {
            assert!(p.backoff(1) <= Duration::from_millis(100));
            assert!(p.backoff(2) <= Duration::from_millis(200));
            assert!(p.backoff(9) <= Duration::from_millis(500));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(3)).collect();
        assert!(spread.len() > 10, "jittered");
    }
}
