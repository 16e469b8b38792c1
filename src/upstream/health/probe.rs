//! Active health probes: a background service that checks every provider continuously with
//! requests that never bill: `GET <base_url>/models` for a cloud provider, the sidecar's
//! `/health` (which also reports its free slots), a configured path, or a bare TCP connect.
//!
//! It reads the live config each round, so providers added by a reload are probed at once and
//! removed ones are dropped. Results go into the shared [`HealthTable`]; a state change is
//! logged once.

use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::header::USER_AGENT;
use http::Method;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::{HealthTable, ProbeState, ProviderHealth};
use crate::metrics::Metrics;
use crate::upstream::exchange::exchange;
use crate::upstream::provider::{ProbeSpec, Provider};

/// A probe's answer body is read up to this size (a model list, a sidecar's health).
const MAX_PROBE_BODY: usize = 256 * 1024;
/// How often the scheduler looks for due probes.
const TICK: Duration = Duration::from_millis(50);
/// How often a restarted provider is probed until it answers.
const RESTART_PROBE_EVERY: Duration = Duration::from_millis(200);
/// How often Redis's topology is asked (its health check, and how a Sentinel failover is
/// noticed without waiting for an error) when configured.
const REDIS_PING_EVERY: Duration = Duration::from_secs(2);

/// Where the prober finds the providers to probe. The live config implements it; upstream code
/// never reads the config itself.
pub trait ProviderList: Send + Sync {
    /// Every provider configured now.
    fn providers(&self) -> Vec<Arc<Provider>>;
}

/// The probing background service.
pub struct Prober {
    /// The providers to probe, read afresh each round (the live config).
    pub providers: Arc<dyn ProviderList>,
    pub health: Arc<HealthTable>,
    pub metrics: Arc<Metrics>,
    /// The fleet's Redis: its topology is asked (which is also its health check).
    pub redis: Option<Arc<lumen_plugins::redis_link::RedisLink>>,
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Arc::new(Connector::new(None));
        let mut redis_due = 0;
        loop {
            let providers = self.providers.providers();
            self.health.sync(providers.iter());
            let now = self.health.now_ms();
            for provider in &providers {
                let state = self.health.get(&provider.name);
                let Some(spec) = provider.probe.clone() else {
                    if state.probe_state() != ProbeState::Unknown {
                        state.clear_probe();
                    }
                    continue;
                };
                if now < state.next_probe_at.load(Acquire) || state.probing.swap(true, AcqRel) {
                    continue;
                }
                // A restarted provider is probed often until it answers, so its circuits
                // reopen as soon as it is back.
                let every = if state.awaiting_restart() {
                    spec.interval.min(RESTART_PROBE_EVERY)
                } else {
                    spec.interval
                };
                state
                    .next_probe_at
                    .store(now + every.as_millis() as u64, Release);
                tokio::spawn(probe_and_record(
                    connector.clone(),
                    provider.clone(),
                    state,
                    spec,
                    self.metrics.clone(),
                ));
            }
            if let Some(redis) = &self.redis {
                if now >= redis_due {
                    redis_due = now + REDIS_PING_EVERY.as_millis() as u64;
                    let (redis, health) = (redis.clone(), self.health.clone());
                    tokio::spawn(async move { health.set_redis(redis.topology().await.is_ok()) });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn probe_and_record(
    connector: Arc<Connector>,
    provider: Arc<Provider>,
    state: Arc<ProviderHealth>,
    spec: ProbeSpec,
    metrics: Arc<Metrics>,
) {
    let result = tokio::time::timeout(spec.timeout, probe(&connector, &provider, &spec))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", spec.timeout)));
    let ok = result.is_ok();
    metrics
        .probes
        .with_label_values(&[provider.name.as_str(), if ok { "ok" } else { "failed" }])
        .inc();
    match result {
        Ok(detail) => {
            if let Some(detail) = detail {
                let slots = sidecar_slots(&detail);
                state.set_reported_slots(slots);
                state.prefixes.set_reported(sidecar_prefixes(&detail));
                state.probe_detail.store(Some(Arc::new(detail)));
            }
        }
        Err(e) => state.set_error(format!("probe: {e}")),
    }
    let previous = state.probe_state();
    let changed = state.record_probe(ok, spec.healthy_threshold, spec.unhealthy_threshold);
    // Back after a restart or an outage: circuits opened by the failures meanwhile let a trial
    // through now, rather than keep a healthy provider out for their whole cooldown.
    let restarted = ok && state.take_restarted();
    let came_back = changed == Some(ProbeState::Healthy) && previous == ProbeState::Unhealthy;
    if restarted || came_back {
        for model in state.recovered() {
            metrics
                .circuit_state
                .with_label_values(&[provider.name.as_str(), model.as_str()])
                .set(crate::upstream::health::CircuitState::HalfOpen.gauge());
            tracing::info!(provider = %provider.name, model = %model, "provider recovered; circuit half-open");
        }
    }
    if let Some(now) = changed {
        metrics
            .provider_healthy
            .with_label_values(&[&provider.name])
            .set(i64::from(now == ProbeState::Healthy));
        if now == ProbeState::Unhealthy || previous != ProbeState::Unknown {
            tracing::warn!(provider = %provider.name, from = previous.label(), to = now.label(), "provider health changed");
        }
    }
    state.probing.store(false, Release);
}

/// One probe: `Ok` with the answer's JSON (when it was JSON) on a 2xx or a TCP connect.
async fn probe(
    connector: &Connector,
    provider: &Provider,
    spec: &ProbeSpec,
) -> Result<Option<serde_json::Value>, String> {
    let peer = provider
        .peer
        .peer()
        .await
        .map_err(|e| format!("resolving: {e}"))?;
    let Some(path) = &spec.path else {
        let addr = peer
            ._address
            .as_inet()
            .copied()
            .ok_or("not an inet address")?;
        tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        return Ok(None);
    };
    let mut head =
        RequestHeader::build(Method::GET, path.as_bytes(), Some(4)).map_err(|e| e.to_string())?;
    let _ = head.insert_header(USER_AGENT, "lumen-health-probe");
    // A model list needs the account's key; it is a free call at every provider.
    if let Some((name, value)) = &provider.credential {
        let _ = head.insert_header(name.clone(), value.clone());
    }
    let answer = exchange(
        connector,
        provider,
        &peer,
        head,
        None,
        spec.timeout,
        MAX_PROBE_BODY,
    )
    .await?;
    let healthy = if spec.lenient {
        (200..500).contains(&answer.status)
    } else {
        (200..300).contains(&answer.status)
    };
    if !healthy {
        return Err(format!("HTTP {}", answer.status));
    }
    Ok(serde_json::from_slice(&answer.body).ok())
}

/// Total `slots_total` over the models of a `lumen-llama` health answer (0 for other JSON).
fn sidecar_slots(detail: &serde_json::Value) -> u32 {
    detail["models"]
        .as_object()
        .map(|models| {
            models
                .values()
                .filter_map(|m| m["slots_total"].as_u64())
                .sum::<u64>()
                .min(u64::from(u32::MAX)) as u32
        })
        .unwrap_or(0)
}

/// The conversation prefix hashes a sidecar's models' caches hold (16 hex digits each).
fn sidecar_prefixes(detail: &serde_json::Value) -> Vec<u64> {
    let Some(models) = detail["models"].as_object() else {
        return Vec::new();
    };
    models
        .values()
        .filter_map(|m| m["prefixes"].as_array())
        .flatten()
        .filter_map(|h| h.as_str().and_then(|h| u64::from_str_radix(h, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{sidecar_prefixes, sidecar_slots};

    #[test]
    fn cached_prefixes_are_read_from_a_sidecar_health_answer() {
        let detail = serde_json::json!({"status": "ok", "models": {
            "a": {"slots_total": 4, "prefixes": ["00000000000000ff", "not hex"]},
            "b": {"slots_total": 2, "prefixes": ["0000000000000001"]},
            "e": {"slots_total": 1}}});
        assert_eq!(sidecar_prefixes(&detail), vec![255, 1]);
        assert!(sidecar_prefixes(&serde_json::json!({"data": []})).is_empty());
    }

    #[test]
    fn slots_are_read_from_a_sidecar_health_answer() {
        let detail = serde_json::json!({"status": "ok", "models": {
            "a": {"loaded": true, "slots_total": 4, "slots_free": 1},
            "b": {"loaded": true, "slots_total": 2, "slots_free": 2}}});
        assert_eq!(sidecar_slots(&detail), 6);
        assert_eq!(
            sidecar_slots(&serde_json::json!({"object": "list", "data": []})),
            0
        );
    }
}
