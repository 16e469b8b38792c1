//! Upstream health: one table of per-provider state that every worker shares and that outlives
//! config reloads (it is keyed by provider name, not held in a snapshot).
//!
//! Three sources feed it: the passive circuit breaker (real requests' outcomes), the active
//! prober (cheap requests that never bill), and what providers say about their own limits
//! (`Retry-After`, `x-ratelimit-*`, our configured quotas). Target selection reads it with
//! atomic loads only; the table itself is an `ArcSwap`'d map, swapped when providers change.

pub mod circuit;
pub mod prefixes;
pub mod probe;
pub mod quota;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::upstream::provider::Provider;
pub use circuit::{Circuit, CircuitConfig, CircuitState, Outcome, Permit};

/// What the active probes last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeState {
    /// Not probed yet (or probes are off): traffic decides, through the circuit.
    Unknown,
    Healthy,
    Unhealthy,
}

impl ProbeState {
    pub fn label(self) -> &'static str {
        match self {
            ProbeState::Unknown => "unknown",
            ProbeState::Healthy => "healthy",
            ProbeState::Unhealthy => "unhealthy",
        }
    }
}

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// Why a target is passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// A supervised sidecar is starting (loading its model): not routed to until its
    /// `/health` answers, so the requests meanwhile neither fail on a refused connection nor
    /// open its circuits.
    Starting,
    Unhealthy,
    CircuitOpen,
    /// The provider asked us to wait (`Retry-After`, `x-ratelimit-remaining-*: 0`).
    RateLimited,
    /// Our configured quota for the provider is used up until its window resets.
    QuotaExhausted,
}

impl Unavailable {
    pub fn label(self) -> &'static str {
        match self {
            Unavailable::Starting => "starting",
            Unavailable::Unhealthy => "unhealthy",
            Unavailable::CircuitOpen => "circuit_open",
            Unavailable::RateLimited => "rate_limited",
            Unavailable::QuotaExhausted => "quota_exhausted",
        }
    }
}

/// The live state of one provider: what is shared by all its models (probes, load, our quota
/// with it, the last error), and each model's own state in [`TargetHealth`].
#[derive(Debug)]
pub struct ProviderHealth {
    pub name: String,
    probe: AtomicU8,
    probe_ok_run: AtomicU32,
    probe_fail_run: AtomicU32,
    /// Requests this node has in flight to the provider now.
    in_flight: AtomicU32,
    /// Our configured quota is used up until this time (table clock, ms).
    quota_until: AtomicU64,
    /// Slots the provider reported in its health answer (a sidecar's `slots_total`; 0: none).
    reported_slots: AtomicU32,
    /// Remaining under our configured quota after the last request (u64::MAX: no quota).
    pub quota_requests_left: AtomicU64,
    pub quota_tokens_left: AtomicU64,
    /// The last probe's JSON answer, when it had one (a sidecar's models and slots).
    pub probe_detail: ArcSwapOption<serde_json::Value>,
    /// The conversations its prompt cache holds (`prefix_affinity` routes).
    pub prefixes: prefixes::HeldPrefixes,
    pub probing: AtomicBool,
    pub next_probe_at: AtomicU64,
    /// The provider's process was restarted (a supervised sidecar): the next healthy probe
    /// half-opens its circuits at once instead of after their cooldown.
    restarted: AtomicBool,
    /// Its supervisor started the provider's process and it has not answered `/health` yet.
    starting: AtomicBool,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Per upstream model: circuit, latency, the provider's own limits. Providers rate-limit
    /// and fail per model (one overloaded model says nothing of another), so these are kept
    /// per model, while reachability (probes) is the provider's.
    models: ArcSwap<HashMap<String, Arc<TargetHealth>>>,
}

/// The state of one model at one provider: the unit a route's target names.
#[derive(Debug, Default)]
pub struct TargetHealth {
    pub circuit: Circuit,
    /// Moving average of time to first byte, µs (0: no sample yet).
    ewma_us: AtomicU64,
    /// Skipped until this time (table clock, ms): the provider asked us to wait.
    skip_until: AtomicU64,
    /// The provider's own token budget (`x-ratelimit-remaining-tokens`) and when it resets.
    tokens_remaining: AtomicU64,
    tokens_reset_at: AtomicU64,
}

impl TargetHealth {
    /// Time to first byte, averaged (None before the first sample).
    pub fn latency(&self) -> Option<Duration> {
        match self.ewma_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Adds a time-to-first-byte sample (weight 1/5: recent enough to follow a provider that
    /// slows down, smooth enough not to chase one slow answer).
    pub fn observe_latency(&self, sample: Duration) {
        let sample = (sample.as_micros() as u64).max(1);
        let _ = self.ewma_us.fetch_update(Relaxed, Relaxed, |old| {
            Some(if old == 0 {
                sample
            } else {
                (old * 4 + sample) / 5
            })
        });
    }

    /// Skips this model until `until` (table clock), keeping the later of two skips.
    pub fn skip(&self, until: u64) {
        self.skip_until.fetch_max(until, AcqRel);
    }

    /// The provider's own report of its token budget, from `x-ratelimit-*-tokens`.
    pub fn set_provider_tokens(&self, remaining: u64, reset_at: u64) {
        self.tokens_remaining.store(remaining, Relaxed);
        self.tokens_reset_at.store(reset_at, Relaxed);
    }

    /// Remaining skip in ms, if skipped.
    pub fn skipped_ms(&self, now_ms: u64) -> Option<u64> {
        let until = self.skip_until.load(Acquire);
        (until > now_ms).then(|| until - now_ms)
    }

    fn rate_limited(&self, now_ms: u64) -> bool {
        now_ms < self.skip_until.load(Acquire)
    }

    /// The provider said it has fewer tokens left than this request may use. Providers refill
    /// continuously, so such a target is tried after the others rather than skipped.
    pub fn low_on_tokens(&self, now_ms: u64, token_estimate: u64) -> bool {
        now_ms < self.tokens_reset_at.load(Relaxed)
            && self.tokens_remaining.load(Relaxed) < token_estimate.max(1)
    }
}

impl ProviderHealth {
    fn new(name: &str) -> ProviderHealth {
        ProviderHealth {
            name: name.to_string(),
            probe: AtomicU8::new(UNKNOWN),
            probe_ok_run: AtomicU32::new(0),
            probe_fail_run: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            quota_until: AtomicU64::new(0),
            reported_slots: AtomicU32::new(0),
            quota_requests_left: AtomicU64::new(u64::MAX),
            quota_tokens_left: AtomicU64::new(u64::MAX),
            probe_detail: ArcSwapOption::empty(),
            prefixes: prefixes::HeldPrefixes::default(),
            probing: AtomicBool::new(false),
            next_probe_at: AtomicU64::new(0),
            restarted: AtomicBool::new(false),
            starting: AtomicBool::new(false),
            last_error: Mutex::new(None),
            models: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// The state of `model` at this provider, created on first use. New models are rare
    /// (once per model name), so creation copies the small map; lookups are lock-free.
    pub fn model(&self, model: &str) -> Arc<TargetHealth> {
        if let Some(t) = self.models.load().get(model) {
            return t.clone();
        }
        self.models.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(model.to_string()).or_default();
            map
        });
        self.models.load().get(model).cloned().unwrap_or_default()
    }

    /// Every model's state, sorted by name.
    pub fn models(&self) -> Vec<(String, Arc<TargetHealth>)> {
        let mut all: Vec<_> = self
            .models
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn probe_state(&self) -> ProbeState {
        match self.probe.load(Acquire) {
            HEALTHY => ProbeState::Healthy,
            UNHEALTHY => ProbeState::Unhealthy,
            _ => ProbeState::Unknown,
        }
    }

    /// Feeds one probe result. The first result decides at once (a fresh node should not
    /// wait `threshold` intervals to learn that a provider is down); after that, a state
    /// changes only after `threshold` results in a row. Returns the new state when it changed.
    pub fn record_probe(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<ProbeState> {
        let (run, other, threshold, target) = if ok {
            (
                &self.probe_ok_run,
                &self.probe_fail_run,
                healthy_threshold,
                HEALTHY,
            )
        } else {
            (
                &self.probe_fail_run,
                &self.probe_ok_run,
                unhealthy_threshold,
                UNHEALTHY,
            )
        };
        other.store(0, Relaxed);
        let n = run.fetch_add(1, Relaxed) + 1;
        let current = self.probe.load(Acquire);
        if current != target && (current == UNKNOWN || n >= threshold.max(1)) {
            self.probe.store(target, Release);
            return Some(self.probe_state());
        }
        None
    }

    /// The provider's process was restarted: probe it soon, and let its first healthy probe
    /// half-open its circuits.
    pub fn mark_restarted(&self) {
        self.restarted.store(true, Release);
        self.next_probe_at.store(0, Release);
    }

    /// The provider's process was (re)started and is not ready yet (`true`), or answered its
    /// first `/health` (`false`): requests go elsewhere, or wait, meanwhile.
    pub fn set_starting(&self, starting: bool) {
        self.starting.store(starting, Release);
    }

    /// Whether the provider's process is starting (see [`ProviderHealth::set_starting`]).
    pub fn starting(&self) -> bool {
        self.starting.load(Acquire)
    }

    /// Whether a restart is waiting for its first healthy probe (probes come faster then).
    pub fn awaiting_restart(&self) -> bool {
        self.restarted.load(Acquire)
    }

    /// Takes the restart mark (the probe that found the provider healthy again).
    pub fn take_restarted(&self) -> bool {
        self.restarted.swap(false, AcqRel)
    }

    /// The provider was seen to recover: every open circuit of its models lets a trial
    /// through now. Returns the models whose circuit changed.
    pub fn recovered(&self) -> Vec<String> {
        self.models()
            .into_iter()
            .filter(|(_, t)| t.circuit.recovered())
            .map(|(model, _)| model)
            .collect()
    }

    /// Forgets probe results (probes were turned off for this provider).
    pub fn clear_probe(&self) {
        self.probe.store(UNKNOWN, Release);
        self.probe_ok_run.store(0, Relaxed);
        self.probe_fail_run.store(0, Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// Our configured quota is used up: skip the provider until `until` (table clock).
    pub fn quota_exhausted(&self, until: u64) {
        self.quota_until.fetch_max(until, AcqRel);
    }

    /// Remaining ms while the quota is used up.
    pub fn quota_wait_ms(&self, now_ms: u64) -> Option<u64> {
        let until = self.quota_until.load(Acquire);
        (until > now_ms).then(|| until - now_ms)
    }

    /// Capacity for "prefer while it has room": configured, else what the provider reported.
    pub fn capacity(&self, configured: Option<u32>) -> Option<u32> {
        configured.or(match self.reported_slots.load(Relaxed) {
            0 => None,
            n => Some(n),
        })
    }

    /// A `lumen-llama` sidecar: its health answer reported slots (it can count tokens).
    pub fn is_sidecar(&self) -> bool {
        self.reported_slots.load(Relaxed) > 0
    }

    pub fn set_reported_slots(&self, slots: u32) {
        self.reported_slots.store(slots, Relaxed);
    }

    /// Full: as many requests in flight as it has room for. A full target is still used
    /// when nothing else is available (it queues), just not preferred.
    pub fn busy(&self, configured: Option<u32>) -> bool {
        self.capacity(configured)
            .is_some_and(|cap| self.in_flight() >= cap)
    }

    /// Whether requests for `target` (one of this provider's models) may go out now.
    pub fn availability(
        &self,
        target: &TargetHealth,
        now_ms: u64,
        circuit: &CircuitConfig,
    ) -> Result<(), Unavailable> {
        if self.starting() {
            return Err(Unavailable::Starting);
        }
        if self.probe_state() == ProbeState::Unhealthy {
            return Err(Unavailable::Unhealthy);
        }
        if !target.circuit.available(now_ms, circuit) {
            return Err(Unavailable::CircuitOpen);
        }
        if now_ms < self.quota_until.load(Acquire) {
            return Err(Unavailable::QuotaExhausted);
        }
        if target.rate_limited(now_ms) {
            return Err(Unavailable::RateLimited);
        }
        Ok(())
    }

    /// Milliseconds until a skipped or open target may be tried again (0: now, or unknown).
    pub fn wait_ms(&self, target: &TargetHealth, now_ms: u64, circuit: &CircuitConfig) -> u64 {
        let skip = target.skip_until.load(Acquire).saturating_sub(now_ms);
        let quota = self.quota_until.load(Acquire).saturating_sub(now_ms);
        skip.max(quota).max(target.circuit.wait_ms(now_ms, circuit))
    }

    pub fn set_error(&self, message: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some((message, SystemTime::now()));
        }
    }

    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Keeps a request counted in its provider's in-flight number.
pub struct InFlight(Arc<ProviderHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Every provider's state, by name.
pub struct HealthTable {
    epoch: Instant,
    states: ArcSwap<HashMap<String, Arc<ProviderHealth>>>,
    /// Whether the last background Redis ping succeeded (`None`: no Redis configured).
    redis: AtomicU8,
}

impl Default for HealthTable {
    fn default() -> Self {
        HealthTable::new()
    }
}

impl HealthTable {
    pub fn new() -> HealthTable {
        HealthTable {
            epoch: Instant::now(),
            states: ArcSwap::from_pointee(HashMap::new()),
            redis: AtomicU8::new(UNKNOWN),
        }
    }

    /// The table's clock: ms since it was made (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// `d` from now on the table's clock.
    pub fn after(&self, d: Duration) -> u64 {
        self.now_ms() + d.as_millis() as u64
    }

    /// Makes the table hold exactly these providers: state for names it already knows is kept
    /// (health survives a reload), new names start fresh, removed names are dropped.
    pub fn sync<'a>(&self, providers: impl Iterator<Item = &'a Arc<Provider>>) {
        let current = self.states.load();
        let mut next = HashMap::new();
        for p in providers {
            let state = current
                .get(&p.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(ProviderHealth::new(&p.name)));
            next.insert(p.name.clone(), state);
        }
        self.states.store(Arc::new(next));
    }

    /// The state of `name`, created on first use (a provider the table was not synced with,
    /// such as one mounted by a library user, still gets health).
    pub fn get(&self, name: &str) -> Arc<ProviderHealth> {
        if let Some(state) = self.states.load().get(name) {
            return state.clone();
        }
        let state = Arc::new(ProviderHealth::new(name));
        self.states.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(name.to_string()).or_insert_with(|| state.clone());
            map
        });
        self.states.load().get(name).cloned().unwrap_or(state)
    }

    /// All states, sorted by name.
    pub fn all(&self) -> Vec<Arc<ProviderHealth>> {
        let mut all: Vec<_> = self.states.load().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn set_redis(&self, ok: bool) {
        self.redis
            .store(if ok { HEALTHY } else { UNHEALTHY }, Relaxed);
    }

    /// The last Redis ping: `None` before the first one.
    pub fn redis_ok(&self) -> Option<bool> {
        match self.redis.load(Relaxed) {
            HEALTHY => Some(true),
            UNHEALTHY => Some(false),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_probe_decides_then_thresholds_apply() {
        let h = ProviderHealth::new("p");
        assert_eq!(h.probe_state(), ProbeState::Unknown);
        assert_eq!(h.record_probe(false, 2, 3), Some(ProbeState::Unhealthy));
        assert_eq!(
            h.record_probe(true, 2, 3),
            None,
            "one success is not enough"
        );
        assert_eq!(h.record_probe(true, 2, 3), Some(ProbeState::Healthy));
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(false, 2, 3), None);
        assert_eq!(h.record_probe(true, 2, 3), None, "a success breaks the run");
        for _ in 0..2 {
            assert_eq!(h.record_probe(false, 2, 3), None);
        }
        assert_eq!(h.record_probe(false, 2, 3), Some(ProbeState::Unhealthy));
    }

    #[test]
    fn skips_and_provider_token_budgets_make_a_target_unavailable() {
        let h = ProviderHealth::new("p");
        let t = h.model("m");
        let other = h.model("n");
        let cfg = CircuitConfig::default();
        assert_eq!(h.availability(&t, 0, &cfg), Ok(()));
        t.skip(1000);
        t.skip(500);
        assert_eq!(h.availability(&t, 999, &cfg), Err(Unavailable::RateLimited));
        assert_eq!(h.availability(&other, 999, &cfg), Ok(()), "per model");
        assert_eq!(h.wait_ms(&t, 400, &cfg), 600);
        assert_eq!(h.availability(&t, 1000, &cfg), Ok(()));
        t.set_provider_tokens(5, 2000);
        assert!(t.low_on_tokens(1500, 10));
        assert!(!t.low_on_tokens(1500, 4));
        assert!(!t.low_on_tokens(2000, 10), "budget reset");
        h.quota_exhausted(3000);
        assert_eq!(
            h.availability(&other, 2500, &cfg),
            Err(Unavailable::QuotaExhausted),
            "quota is the account's"
        );
        assert!(Arc::ptr_eq(&t, &h.model("m")), "one state per model");
    }

    #[test]
    fn capacity_from_config_or_report_decides_busy() {
        let h = Arc::new(ProviderHealth::new("p"));
        assert!(!h.busy(None), "no capacity known: never busy");
        h.set_reported_slots(2);
        let _a = h.enter();
        assert!(!h.busy(None));
        let b = h.enter();
        assert!(h.busy(None));
        assert!(!h.busy(Some(3)), "configured capacity wins");
        drop(b);
        assert!(!h.busy(None));
    }

    #[test]
    fn latency_average_follows_samples() {
        let h = TargetHealth::default();
        assert_eq!(h.latency(), None);
        h.observe_latency(Duration::from_millis(100));
        assert_eq!(h.latency(), Some(Duration::from_millis(100)));
        h.observe_latency(Duration::from_millis(600));
        assert_eq!(h.latency(), Some(Duration::from_millis(200)));
    }
}
