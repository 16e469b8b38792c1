//! What a route does when an attempt fails: which failures are retried, how many attempts in
//! all, how long to back off, and the deadline after which the client gets the last error.
//!
//! Falling back to a target not yet tried happens at once; backoff (exponential, full jitter)
//! applies only before trying a target again, because a different provider's health owes
//! nothing to the one that just failed.

use std::time::Duration;

use crate::config::raw::RawRetry;

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
const MAX_ATTEMPTS: u32 = 10;

impl RetryPolicy {
    /// The policy for a route with `targets` targets. Unset, every target is tried once, plus
    /// one more attempt (so a single-target route retries once), on every retryable failure.
    pub fn from_raw(raw: Option<&RawRetry>, targets: usize) -> Result<RetryPolicy, String> {
        let mut policy = RetryPolicy::default_for(targets);
        let Some(raw) = raw else {
            return Ok(policy);
        };
        if let Some(attempts) = raw.attempts {
            if !(1..=MAX_ATTEMPTS).contains(&attempts) {
                return Err(format!(
                    "attempts must be between 1 and {MAX_ATTEMPTS}, not {attempts}"
                ));
            }
            policy.attempts = attempts;
        }
        if let Some(on) = &raw.on {
            policy.connect = false;
            policy.timeout = false;
            policy.dropped = false;
            policy.status_429 = false;
            policy.status_5xx = false;
            for item in on {
                match item.as_str() {
                    "connect" => policy.connect = true,
                    "timeout" => policy.timeout = true,
                    "dropped" => policy.dropped = true,
                    "429" => policy.status_429 = true,
                    "5xx" => policy.status_5xx = true,
                    code => match code.parse::<u16>() {
                        Ok(c) if (400..600).contains(&c) => policy.statuses.push(c),
                        _ => {
                            return Err(format!(
                                "unknown failure `{code}` in `on` (use connect, timeout, dropped, 429, 5xx, or a status code 400-599)"
                            ))
                        }
                    },
                }
            }
        }
        if raw.backoff.max < raw.backoff.base {
            return Err("backoff.max must not be below backoff.base".into());
        }
        policy.backoff_base = raw.backoff.base;
        policy.backoff_max = raw.backoff.max;
        if raw.deadline.is_some_and(|d| d.is_zero()) {
            return Err("deadline must be above zero".into());
        }
        policy.deadline = raw.deadline;
        Ok(policy)
    }

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
    use crate::config::raw::RawBackoff;

    fn raw(on: &[&str]) -> RawRetry {
        RawRetry {
            attempts: Some(4),
            on: Some(on.iter().map(|s| s.to_string()).collect()),
            backoff: RawBackoff {
                base: Duration::from_millis(100),
                max: Duration::from_millis(500),
            },
            deadline: Some(Duration::from_secs(3)),
        }
    }

    #[test]
    fn defaults_retry_everything_once_per_target_plus_one() {
        let p = RetryPolicy::from_raw(None, 3).unwrap();
        assert_eq!(p.attempts, 4);
        for f in [
            Failure::Connect,
            Failure::Timeout,
            Failure::Dropped,
            Failure::Status(429),
            Failure::Status(503),
        ] {
            assert!(p.retries(f), "{f:?}");
        }
        assert!(!p.retries(Failure::Status(400)));
        assert!(!p.retries(Failure::Status(404)));
    }

    #[test]
    fn on_lists_exactly_what_is_retried() {
        let p = RetryPolicy::from_raw(Some(&raw(&["connect", "503"])), 2).unwrap();
        assert!(p.retries(Failure::Connect));
        assert!(p.retries(Failure::Status(503)));
        assert!(!p.retries(Failure::Status(500)));
        assert!(!p.retries(Failure::Status(429)));
        assert!(!p.retries(Failure::Timeout));
        let e = RetryPolicy::from_raw(Some(&raw(&["sometimes"])), 2).unwrap_err();
        assert!(e.contains("sometimes"), "{e}");
        let mut r = raw(&[]);
        r.attempts = Some(0);
        assert!(RetryPolicy::from_raw(Some(&r), 1).is_err());
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_cap() {
        let p = RetryPolicy::from_raw(Some(&raw(&["5xx"])), 1).unwrap();
        for _ in 0..200 {
            assert!(p.backoff(1) <= Duration::from_millis(100));
            assert!(p.backoff(2) <= Duration::from_millis(200));
            assert!(p.backoff(9) <= Duration::from_millis(500));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(3)).collect();
        assert!(spread.len() > 10, "jittered");
    }
}
