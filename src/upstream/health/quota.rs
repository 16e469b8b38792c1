//! Provider quotas: what our account may use at a provider, and what the provider says is left.
//!
//! Configured quotas (`quota:` on a provider: requests and tokens per minute and per day) are
//! fixed windows counted per attempt, in process or, with Redis, across the fleet, using the
//! same window counters as key token budgets. A provider whose quota is used up is skipped
//! until its window resets. Providers' own headers say the same thing from their side:
//! `Retry-After` on a 429/503, and OpenAI's `x-ratelimit-remaining-*` / `x-ratelimit-reset-*`
//! on every answer; they are honoured by skipping the provider, never by sleeping on them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use lumen_plugins::rate_limit::shared::{SharedLimiter, SharedReservation};
use lumen_plugins::rate_limit::{LocalLimiter, TokenLimit, TokenReservation};

use super::{HealthTable, ProviderHealth, TargetHealth, Unavailable};
use crate::upstream::provider::QuotaSpec;

/// A provider's `Retry-After` is trusted up to this long; beyond it, probes and the circuit
/// decide.
const MAX_SKIP: Duration = Duration::from_secs(3600);

enum Reservation {
    Local(TokenReservation),
    Shared(SharedReservation),
}

/// What one attempt took from a provider's quota; settle it with the tokens used.
#[derive(Default)]
pub struct QuotaHold {
    tokens: Option<Reservation>,
}

/// Quota counters for every provider.
pub struct Quotas {
    local: LocalLimiter,
    shared: Option<Arc<SharedLimiter>>,
}

impl Quotas {
    pub fn new(shared: Option<Arc<SharedLimiter>>) -> Quotas {
        Quotas {
            local: LocalLimiter::new(),
            shared,
        }
    }

    /// Counts one request against `spec` and checks the token windows still have room.
    /// Refused: the provider is skipped until the exhausted window resets.
    pub async fn take(
        &self,
        spec: &QuotaSpec,
        state: &ProviderHealth,
        table: &HealthTable,
    ) -> Result<QuotaHold, Unavailable> {
        if spec.is_empty() {
            return Ok(QuotaHold::default());
        }
        let mut hold = QuotaHold::default();
        if !spec.requests.is_empty() {
            let (reservation, left) = self
                .reserve(
                    &format!("quota:{}:requests", state.name),
                    &spec.requests,
                    1,
                    state,
                    table,
                    true,
                )
                .await?;
            state.quota_requests_left.store(left, Relaxed);
            // Requests are counted as they start: kept as reserved (an unsettled local
            // reservation would be refunded when dropped).
            if let Some(Reservation::Local(r)) = reservation {
                let counted = r.reserved;
                r.settle(counted);
            }
        }
        if !spec.tokens.is_empty() {
            // One token "reserved" asks whether any is left; the real count is settled after.
            let (reservation, left) = self
                .reserve(
                    &format!("quota:{}:tokens", state.name),
                    &spec.tokens,
                    1,
                    state,
                    table,
                    false,
                )
                .await?;
            state.quota_tokens_left.store(left, Relaxed);
            hold.tokens = reservation;
        }
        Ok(hold)
    }

    async fn reserve(
        &self,
        bucket: &str,
        limits: &[TokenLimit],
        amount: u64,
        state: &ProviderHealth,
        table: &HealthTable,
        kept: bool,
    ) -> Result<(Option<Reservation>, u64), Unavailable> {
        let refused = |retry_after: Duration| {
            state.quota_exhausted(table.after(retry_after));
            Unavailable::QuotaExhausted
        };
        if let Some(shared) = &self.shared {
            // Requests are counted for good (nothing to settle: no record in Redis); tokens
            // are settled with what the attempt used.
            let asked = match kept {
                true => shared
                    .count_tokens(bucket, limits, amount)
                    .await
                    .map(|counted| counted.map(|status| (None, status))),
                false => shared
                    .reserve_tokens(bucket, limits, amount)
                    .await
                    .map(|reserved| reserved.map(|(r, status)| (Some(r), status)))
                    .map_err(|unanswered| {
                        // If it may have been made, it is given back once Redis answers.
                        if unanswered.error.may_have_run() {
                            shared.settle_tokens_later(unanswered.pending, 0);
                        }
                        unanswered.error
                    }),
            };
            match asked {
                Ok(Ok((r, status))) => {
                    return Ok((r.map(Reservation::Shared), u64::from(status.remaining)))
                }
                Ok(Err(limited)) => return Err(refused(limited.retry_after)),
                // Redis down: count in process rather than stop using the provider.
                Err(_) => {}
            }
        }
        match self
            .local
            .reserve_tokens(bucket, limits, amount, Instant::now())
        {
            Ok((r, status)) => Ok((Some(Reservation::Local(r)), u64::from(status.remaining))),
            Err(limited) => Err(refused(limited.retry_after)),
        }
    }

    /// Replaces the one token a hold asked with the tokens the request really used.
    pub async fn settle(&self, hold: QuotaHold, used: u64) {
        match hold.tokens {
            None => {}
            Some(Reservation::Local(r)) => r.settle(used),
            Some(Reservation::Shared(r)) => {
                if let Some(shared) = &self.shared {
                    // Boxed: a Redis call's state (some KiB) would otherwise be part of the
                    // future of every request that settles, quota or not.
                    if Box::pin(shared.settle_tokens(&r, used)).await.is_err() {
                        shared.settle_tokens_later(r, used);
                    }
                }
            }
        }
    }
}

/// Reads what a provider says about its limits off a response and skips it accordingly:
/// `Retry-After` (on 429 and 503), `x-ratelimit-remaining-requests: 0` until
/// `x-ratelimit-reset-requests`, and the remaining token budget for later requests to weigh.
pub fn read_provider_limits(
    status: u16,
    headers: &HeaderMap,
    target: &TargetHealth,
    table: &HealthTable,
) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if matches!(status, 429 | 503) {
        if let Some(wait) = header("retry-after").and_then(parse_retry_after) {
            target.skip(table.after(wait.min(MAX_SKIP)));
        }
    }
    if header("x-ratelimit-remaining-requests").and_then(|v| v.trim().parse::<u64>().ok())
        == Some(0)
    {
        let wait = header("x-ratelimit-reset-requests")
            .and_then(parse_reset)
            .unwrap_or(Duration::from_secs(1));
        target.skip(table.after(wait.min(MAX_SKIP)));
    }
    if let Some(left) =
        header("x-ratelimit-remaining-tokens").and_then(|v| v.trim().parse::<u64>().ok())
    {
        let wait = header("x-ratelimit-reset-tokens")
            .and_then(parse_reset)
            .unwrap_or(Duration::from_secs(1));
        target.set_provider_tokens(left, table.after(wait.min(MAX_SKIP)));
    }
}

/// `Retry-After` as seconds (`"2"`, `"1.5"`). HTTP dates are not used by LLM providers.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// OpenAI's reset format: `1s`, `6m0s`, `59.54s`, `20ms`, `1h2m3s` (also bare seconds).
pub fn parse_reset(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let mut total = 0.0f64;
    let mut rest = v;
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && !v.is_empty()).then(|| Duration::from_secs_f64(total.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::CircuitConfig;

    #[test]
    fn reset_durations_in_openai_format() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("59.5s"), Some(Duration::from_millis(59_500)));
        assert_eq!(parse_reset("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_reset(""), None);
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(
            parse_reset("1e20"),
            Some(Duration::from_secs(86_400)),
            "bounded, no panic"
        );
        assert_eq!(
            parse_reset("99999999999999999999"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(parse_reset("5x"), None);
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn provider_headers_skip_the_model() {
        let table = HealthTable::new();
        let provider = ProviderHealth::new("p");
        let state = provider.model("m");
        let cfg = CircuitConfig::default();
        let available = |t: &TargetHealth| provider.availability(t, table.now_ms(), &cfg);
        let mut h = HeaderMap::new();
        h.insert("retry-after", "30".parse().unwrap());
        read_provider_limits(200, &h, &state, &table);
        assert!(available(&state).is_ok(), "only on 429/503");
        read_provider_limits(429, &h, &state, &table);
        assert_eq!(available(&state), Err(Unavailable::RateLimited));
        let state = provider.model("q");
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-requests", "2s".parse().unwrap());
        read_provider_limits(200, &h, &state, &table);
        let left = state.skipped_ms(table.now_ms()).expect("skipped");
        assert!(left > 1000 && left <= 2000, "{left}");
    }

    #[tokio::test]
    async fn configured_quota_is_counted_and_exhaustion_skips() {
        let table = HealthTable::new();
        let state = ProviderHealth::new("p");
        let quotas = Quotas::new(None);
        let spec = QuotaSpec::new(Some(2), None, None, Some(100));
        let hold = quotas.take(&spec, &state, &table).await.expect("first");
        quotas.settle(hold, 99).await;
        // The token window has 1 left: a request may still start.
        let hold = quotas.take(&spec, &state, &table).await.expect("second");
        quotas.settle(hold, 10).await;
        assert_eq!(
            quotas.take(&spec, &state, &table).await.err(),
            Some(Unavailable::QuotaExhausted)
        );
        let left = state.quota_wait_ms(table.now_ms()).expect("skipped");
        assert!(left > 0);
    }
}
