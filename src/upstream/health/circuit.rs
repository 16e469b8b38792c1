//! A per-provider circuit breaker: passive health from real traffic.
//!
//! Closed: requests flow; consecutive failures, or a failure ratio over a window, open it.
//! Open: the provider is skipped until `cooldown` has passed. Half-open: exactly one trial
//! request goes through; success closes the circuit, failure opens it for another cooldown.
//!
//! Every request to a provider touches its breaker, so the state is atomics, not a lock: the
//! closed path is a few relaxed loads and adds. Races between concurrent outcomes can at worst
//! open the circuit one request early or late, which the next outcome corrects.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::time::Duration;

/// When the breaker opens and how long it stays open.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitConfig {
    pub failures: u32,
    pub error_ratio: f64,
    pub window: Duration,
    pub min_requests: u32,
    pub cooldown: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failures: 5,
            error_ratio: 0.5,
            window: Duration::from_secs(60),
            min_requests: 20,
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// The `lumen_circuit_state` gauge value.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Permission to send one request; hand it back with [`Circuit::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    /// This is the half-open trial: its outcome decides the circuit.
    pub trial: bool,
}

/// What an attempt's outcome says about the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Says nothing about the provider (the client went away, a 4xx for a bad request).
    Neutral,
}

#[derive(Debug, Default)]
pub struct Circuit {
    state: AtomicU8,
    /// When it last opened (ms on the health table's clock).
    opened_at: AtomicU64,
    trial_in_flight: AtomicBool,
    consecutive: AtomicU32,
    window_start: AtomicU64,
    window_ok: AtomicU32,
    window_failed: AtomicU32,
}

impl Circuit {
    /// The state as a reader sees it: an open circuit whose cooldown passed reports half-open.
    pub fn state(&self, now_ms: u64, cfg: &CircuitConfig) -> CircuitState {
        match self.state.load(Acquire) {
            CLOSED => CircuitState::Closed,
            OPEN if now_ms < self.reopens_at(cfg) => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    fn reopens_at(&self, cfg: &CircuitConfig) -> u64 {
        self.opened_at.load(Acquire) + cfg.cooldown.as_millis() as u64
    }

    /// Whether a request could go through now (without taking the trial).
    pub fn available(&self, now_ms: u64, cfg: &CircuitConfig) -> bool {
        match self.state(now_ms, cfg) {
            CircuitState::Closed => true,
            CircuitState::Open => false,
            CircuitState::HalfOpen => !self.trial_in_flight.load(Acquire),
        }
    }

    /// Milliseconds until an open circuit lets a trial through (0 when not open).
    pub fn wait_ms(&self, now_ms: u64, cfg: &CircuitConfig) -> u64 {
        match self.state(now_ms, cfg) {
            CircuitState::Open => self.reopens_at(cfg).saturating_sub(now_ms),
            _ => 0,
        }
    }

    /// Takes permission to send a request: always when closed; when the cooldown has passed,
    /// only for the one caller that wins the trial.
    pub fn acquire(&self, now_ms: u64, cfg: &CircuitConfig) -> Option<Permit> {
        match self.state(now_ms, cfg) {
            CircuitState::Closed => Some(Permit { trial: false }),
            CircuitState::Open => None,
            CircuitState::HalfOpen => {
                if self
                    .trial_in_flight
                    .compare_exchange(false, true, AcqRel, Acquire)
                    .is_err()
                {
                    return None;
                }
                self.state.store(HALF_OPEN, Release);
                Some(Permit { trial: true })
            }
        }
    }

    /// Feeds one outcome back. Returns `true` when this outcome changed the state.
    pub fn record(
        &self,
        permit: Permit,
        outcome: Outcome,
        now_ms: u64,
        cfg: &CircuitConfig,
    ) -> bool {
        if permit.trial {
            let changed = match outcome {
                Outcome::Success => {
                    self.reset_counts(now_ms);
                    self.state.store(CLOSED, Release);
                    true
                }
                Outcome::Failure => {
                    self.open(now_ms);
                    true
                }
                Outcome::Neutral => false,
            };
            self.trial_in_flight.store(false, Release);
            return changed;
        }
        let window_ms = cfg.window.as_millis().max(1) as u64;
        let start = self.window_start.load(Acquire);
        if now_ms.saturating_sub(start) >= window_ms
            && self
                .window_start
                .compare_exchange(start, now_ms, AcqRel, Acquire)
                .is_ok()
        {
            self.window_ok.store(0, Relaxed);
            self.window_failed.store(0, Relaxed);
        }
        match outcome {
            Outcome::Success => {
                self.consecutive.store(0, Relaxed);
                self.window_ok.fetch_add(1, Relaxed);
                false
            }
            Outcome::Neutral => false,
            Outcome::Failure => {
                let run = self.consecutive.fetch_add(1, Relaxed) + 1;
                let failed = self.window_failed.fetch_add(1, Relaxed) + 1;
                let total = failed + self.window_ok.load(Relaxed);
                let ratio_tripped = total >= cfg.min_requests.max(1)
                    && f64::from(failed) / f64::from(total) >= cfg.error_ratio;
                if (run >= cfg.failures.max(1) || ratio_tripped)
                    && self
                        .state
                        .compare_exchange(CLOSED, OPEN, AcqRel, Acquire)
                        .is_ok()
                {
                    self.opened_at.store(now_ms, Release);
                    return true;
                }
                false
            }
        }
    }

    /// Hands back a permit whose attempt never reported (its holder was dropped): a trial
    /// frees the half-open slot, as a neutral outcome would.
    pub fn abandon(&self, permit: Permit) {
        if permit.trial {
            self.trial_in_flight.store(false, Release);
        }
    }

    /// The provider was seen to recover (a healthy probe after a failure, a restarted
    /// sidecar): an open circuit lets its trial through now instead of after the cooldown.
    /// Returns `true` when the circuit was open.
    pub fn recovered(&self) -> bool {
        self.state
            .compare_exchange(OPEN, HALF_OPEN, AcqRel, Acquire)
            .is_ok()
    }

    fn open(&self, now_ms: u64) {
        self.opened_at.store(now_ms, Release);
        self.state.store(OPEN, Release);
    }

    fn reset_counts(&self, now_ms: u64) {
        self.consecutive.store(0, Relaxed);
        self.window_start.store(now_ms, Relaxed);
        self.window_ok.store(0, Relaxed);
        self.window_failed.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitConfig {
        CircuitConfig {
            failures: 3,
            error_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            cooldown: Duration::from_millis(1000),
        }
    }

    fn fail(c: &Circuit, now: u64) -> bool {
        let p = c.acquire(now, &cfg()).expect("permit");
        c.record(p, Outcome::Failure, now, &cfg())
    }

    fn succeed(c: &Circuit, now: u64) {
        let p = c.acquire(now, &cfg()).expect("permit");
        c.record(p, Outcome::Success, now, &cfg());
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_run() {
        let c = Circuit::default();
        assert!(!fail(&c, 1));
        assert!(!fail(&c, 2));
        succeed(&c, 3);
        assert!(!fail(&c, 4));
        assert!(!fail(&c, 5));
        assert_eq!(c.state(5, &cfg()), CircuitState::Closed);
        assert!(fail(&c, 6), "third failure in a row opens it");
        assert_eq!(c.state(7, &cfg()), CircuitState::Open);
        assert!(c.acquire(7, &cfg()).is_none());
        assert!(!c.available(7, &cfg()));
        assert_eq!(c.wait_ms(7, &cfg()), 999);
    }

    #[test]
    fn opens_on_error_ratio_over_the_window() {
        let c = Circuit::default();
        // Alternate success and failure: never 3 in a row, but 50% over 10 requests.
        for i in 0..9 {
            if i % 2 == 0 {
                succeed(&c, i);
            } else {
                assert!(!fail(&c, i));
            }
        }
        assert!(fail(&c, 9), "5 of 10 failed");
        assert_eq!(c.state(10, &cfg()), CircuitState::Open);
    }

    #[test]
    fn half_open_lets_exactly_one_trial_through_then_closes_or_reopens() {
        let c = Circuit::default();
        for t in 0..3 {
            fail(&c, t);
        }
        assert_eq!(c.state(1002, &cfg()), CircuitState::HalfOpen);
        let trial = c.acquire(1002, &cfg()).expect("trial");
        assert!(trial.trial);
        assert!(
            c.acquire(1003, &cfg()).is_none(),
            "only one trial at a time"
        );
        assert!(!c.available(1003, &cfg()));
        // The trial fails: open again for a full cooldown from now.
        assert!(c.record(trial, Outcome::Failure, 1004, &cfg()));
        assert_eq!(c.state(1500, &cfg()), CircuitState::Open);
        let trial = c.acquire(2004, &cfg()).expect("second trial");
        assert!(c.record(trial, Outcome::Success, 2005, &cfg()));
        assert_eq!(c.state(2006, &cfg()), CircuitState::Closed);
        // Counts were reset: it takes a full run of failures to open again.
        assert!(!fail(&c, 2007));
        assert!(!fail(&c, 2008));
        assert!(fail(&c, 2009));
    }

    #[test]
    fn an_abandoned_trial_is_handed_back() {
        let c = Circuit::default();
        for t in 0..3 {
            fail(&c, t);
        }
        let trial = c.acquire(1100, &cfg()).expect("trial");
        assert!(c.acquire(1101, &cfg()).is_none());
        c.abandon(trial);
        assert!(c.acquire(1102, &cfg()).expect("the trial again").trial);
    }

    #[test]
    fn a_recovered_provider_half_opens_at_once() {
        let c = Circuit::default();
        for t in 0..3 {
            fail(&c, t);
        }
        assert_eq!(c.state(10, &cfg()), CircuitState::Open);
        assert!(c.recovered());
        assert_eq!(c.state(11, &cfg()), CircuitState::HalfOpen);
        let trial = c.acquire(11, &cfg()).expect("trial before the cooldown");
        assert!(trial.trial);
        assert!(!c.recovered(), "only an open circuit changes");
        assert!(c.record(trial, Outcome::Success, 12, &cfg()));
        assert_eq!(c.state(13, &cfg()), CircuitState::Closed);
    }

    #[test]
    fn a_neutral_trial_hands_the_trial_back() {
        let c = Circuit::default();
        for t in 0..3 {
            fail(&c, t);
        }
        let trial = c.acquire(1100, &cfg()).expect("trial");
        assert!(!c.record(trial, Outcome::Neutral, 1101, &cfg()));
        assert!(c.acquire(1102, &cfg()).expect("another trial").trial);
    }
}
