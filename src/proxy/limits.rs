//! Rate limits at their pipeline steps: per client address (step 3), per key (requests and
//! concurrency, step 5), per key on a route (step 8), and token budgets (reserved at step 10,
//! settled when the request ends). Through Redis when configured, else in this process; when
//! Redis fails, `redis.on_error` decides. Every limit that applied is reported in OpenAI's
//! `x-ratelimit-*` headers, the tightest one when several did.
//!
//! Redis calls are awaited boxed (`Box::pin`): inline, their state would be part of every
//! request's future, which is moved whole once per request (see `proxy`'s module doc).

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::session::Session;
use http::{HeaderName, HeaderValue};
use lumen_plugins::auth::Principal;
use lumen_plugins::rate_limit::shared::{
    OnRedisError, ReservationGuard, SharedError, SharedLimiter, SlotGuard,
};
use lumen_plugins::rate_limit::{format_reset, LimitReason, Limited, RateStatus, RequestLimit};

use super::admit::client_address;
use super::ctx::{new_slot_id, RequestCtx, TokenHold};
use super::forward::Settle;
use super::gateway::Gateway;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::openai::{LlmRequest, DEFAULT_COMPLETION_TOKENS};
use crate::routing::Route;

#[async_trait::async_trait]
impl Settle for Gateway {
    async fn settle(&self, ctx: &mut RequestCtx) {
        // A finished Responses answer is stored before the client has its end: its next turn
        // (on any node) finds it.
        self.keep_response(ctx).await;
        self.release(ctx).await;
    }
}

impl Gateway {
    /// When the answer is complete (before the client is sent the last of it), and again when
    /// the request ends: the key's concurrency slots are given back, and the token reservation
    /// settled with what was used. What was given back is gone from `ctx`: a second call does
    /// nothing.
    pub(super) async fn release(&self, ctx: &mut RequestCtx) {
        ctx.in_flight = None;
        let slot = ctx.shared_slot.take();
        let tokens = ctx.tokens.take().map(|hold| {
            // Settle with what the provider reported; else what was streamed (a client that
            // left mid-stream pays for what was generated). No answer: nothing used.
            let reserved = match &hold {
                TokenHold::Local(r) | TokenHold::FailedOpen { local: r, .. } => r.reserved,
                TokenHold::Shared(r) => r.reserved(),
            };
            let actual = match ctx.usage_total.or(ctx.usage_estimate) {
                Some(total) => total,
                // (Without the hedges' prompts reserved: those that ran are added below.)
                None if ctx.status == 200 => reserved.saturating_sub(ctx.hedge_reserve),
                None => 0,
            }
            .saturating_add(ctx.hedge_spent.0);
            (hold, actual)
        });
        // The cost is worked out (and a job's noted) now, before anything is awaited.
        let money = self.settle_money(ctx);
        // The fleet-wide slot is given back before this connection reads its next request (a
        // client's next call must find it free); were this future dropped, the guard would.
        if let Some(slot) = slot {
            Box::pin(slot.release()).await;
        }
        // Tokens and dollars settle side by side (through Redis: two round trips at once).
        match tokens {
            Some((hold, actual)) => {
                tokio::join!(self.settle_tokens(hold, actual), money);
            }
            None => money.await,
        }
    }

    /// The limits shared through Redis, when configured.
    fn shared(&self) -> Option<&Arc<SharedLimiter>> {
        self.node.redis.as_ref().map(|r| &r.limits)
    }

    /// Step 3: the per-address limit (`limits.per_ip`), never on the internal jobs socket.
    pub(super) async fn limit_address(
        &self,
        s: &Session,
        ctx: &mut RequestCtx,
        config: &Snapshot,
    ) -> Result<(), GatewayError> {
        let Some(per_ip) = &config.limits.per_ip else {
            return Ok(());
        };
        let address = client_address(s, &config.server.trusted_proxies, per_ip.ipv6_prefix);
        match self.check_address(address, &per_ip.limit).await {
            Ok(_) => Ok(()),
            Err(limited) => Err(self.refuse(ctx, &limited)),
        }
    }

    /// Step 8: the route's own request limit, per key.
    pub(super) async fn limit_route(
        &self,
        ctx: &mut RequestCtx,
        principal: &Principal,
        route: &Route,
    ) -> Result<(), GatewayError> {
        let Some(limit) = &route.limits else {
            return Ok(());
        };
        let bucket = format!("{}{}", principal.key_id, route.bucket_suffix);
        match self.check_requests(&bucket, limit).await {
            Ok(status) => {
                push_headers(ctx, "requests", &status);
                Ok(())
            }
            Err(limited) => Err(self.refuse(ctx, &limited)),
        }
    }

    /// The per-address request limit: through Redis when configured (exact, keys expire),
    /// else (and when Redis fails open) in this process's fixed-size [`AddressLimiter`].
    pub(super) async fn check_address(
        &self,
        address: std::net::IpAddr,
        limit: &RequestLimit,
    ) -> Result<RateStatus, Limited> {
        let local = || self.addresses.check(address, limit, Instant::now());
        let Some(shared) = self.shared() else {
            return local();
        };
        match Box::pin(shared.check_request(&format!("ip:{address}"), limit)).await {
            Ok(result) => result,
            Err(e) => match self.redis_failed(&e) {
                OnRedisError::FailOpen => local(),
                OnRedisError::FailClosed => Err(unavailable(limit.count)),
            },
        }
    }

    /// Applies the caller's request-rate and concurrency limits, adding the `x-ratelimit-*`
    /// headers to whatever response follows (a 429 gets `Retry-After` too).
    pub(super) async fn limit(
        &self,
        ctx: &mut RequestCtx,
        principal: &Principal,
    ) -> Result<(), GatewayError> {
        let Some(limits) = &principal.limits else {
            return Ok(());
        };
        if limits.requests.is_none() && limits.concurrency.is_none() {
            return Ok(());
        }
        // With Redis: rate and concurrency in one round trip.
        if let Some(shared) = self.shared() {
            // The slot's member is ours, never the client's `x-request-id`: a client reusing
            // one id must not hold one slot for many requests.
            let member = if limits.concurrency.is_some() {
                new_slot_id()
            } else {
                String::new()
            };
            match Box::pin(shared.admit(
                &principal.key_id,
                limits.requests.as_ref(),
                limits.concurrency,
                &member,
            ))
            .await
            {
                Ok(Ok(admitted)) => {
                    if let Some(status) = admitted.rate {
                        push_headers(ctx, "requests", &status);
                    }
                    ctx.shared_slot = admitted.slot.map(|s| SlotGuard::new(shared.clone(), s));
                    return Ok(());
                }
                Ok(Err(limited)) => return Err(self.refuse(ctx, &limited)),
                Err(e) => {
                    if limits.concurrency.is_some() {
                        // A timed-out admit may still have run and taken the slot: give it
                        // back rather than let it count for IN_FLIGHT_STALE_AFTER.
                        drop(SlotGuard::new(
                            shared.clone(),
                            shared.slot(&principal.key_id, &member),
                        ));
                    }
                    if self.redis_failed(&e) == OnRedisError::FailClosed {
                        let limit = limits.requests.as_ref().map_or(0, |l| l.count);
                        return Err(self.refuse(ctx, &unavailable(limit)));
                    }
                    // Fail open: the node's own limiter below.
                }
            }
        }
        if let Some(requests) = &limits.requests {
            match self
                .limiter
                .check_request(&principal.key_id, requests, Instant::now())
            {
                Ok(status) => push_headers(ctx, "requests", &status),
                Err(limited) => return Err(self.refuse(ctx, &limited)),
            }
        }
        if let Some(max) = limits.concurrency {
            match self.limiter.acquire(&principal.key_id, max) {
                Ok(slot) => ctx.in_flight = Some(slot),
                Err(limited) => return Err(self.refuse(ctx, &limited)),
            }
        }
        Ok(())
    }

    /// A request-rate check for a bucket other than the key's own (route, client address):
    /// through Redis when configured, else local; on Redis failure, per `on_redis_error`.
    pub(super) async fn check_requests(
        &self,
        key: &str,
        limit: &RequestLimit,
    ) -> Result<RateStatus, Limited> {
        let Some(shared) = self.shared() else {
            return self.limiter.check_request(key, limit, Instant::now());
        };
        match Box::pin(shared.check_request(key, limit)).await {
            Ok(result) => result,
            Err(e) => match self.redis_failed(&e) {
                OnRedisError::FailOpen => self.limiter.check_request(key, limit, Instant::now()),
                OnRedisError::FailClosed => Err(unavailable(limit.count)),
            },
        }
    }

    /// Counts and (once per burst) logs a Redis failure of the rate limits; returns what to do
    /// about it.
    pub(super) fn redis_failed(&self, e: &SharedError) -> OnRedisError {
        self.redis_failed_for(e, "rate_limit")
    }

    /// Counts (under `op`) and once per burst logs a Redis failure; returns what to do.
    pub(super) fn redis_failed_for(&self, e: &SharedError, op: &str) -> OnRedisError {
        let on_error = self
            .node
            .redis
            .as_ref()
            .map_or(OnRedisError::FailOpen, |r| r.on_error);
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.redis_logged_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) > 10_000
            && self
                .redis_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, on_redis_error = ?on_error, op, "redis unavailable for limits");
        }
        on_error
    }

    /// Reserves the request's estimated tokens under the caller's token budgets (in Redis when
    /// configured): `None` when it has none. [`Gateway::hold_tokens`] applies the outcome.
    pub(super) async fn reserve_tokens(
        &self,
        principal: &Principal,
        req: &LlmRequest,
        hedges: u64,
    ) -> Option<Result<(TokenHold, RateStatus), Limited>> {
        let limits = principal.limits.as_ref().filter(|l| !l.tokens.is_empty())?;
        // A hedged route may send the prompt to `hedges` more targets: their prompts are
        // reserved too (each is settled with what was really used).
        let estimate = match hedges {
            0 => req.token_estimate(DEFAULT_COMPLETION_TOKENS),
            n => req
                .token_estimate(DEFAULT_COMPLETION_TOKENS)
                .saturating_add(n.saturating_mul(req.token_split(0).0)),
        };
        let local = || {
            self.limiter
                .reserve_tokens(&principal.key_id, &limits.tokens, estimate, Instant::now())
                .map(|(r, status)| (TokenHold::Local(r), status))
        };
        let result = match self.shared() {
            None => local(),
            Some(shared) => {
                match Box::pin(shared.reserve_tokens(&principal.key_id, &limits.tokens, estimate))
                    .await
                {
                    Ok(result) => result.map(|(r, status)| {
                        (
                            TokenHold::Shared(ReservationGuard::new(shared.clone(), r)),
                            status,
                        )
                    }),
                    Err(unanswered) => {
                        // The reservation may have been made: refunded, or (served in process
                        // meanwhile) settled with what the request used, once Redis answers.
                        let on_error = self.redis_failed(&unanswered.error);
                        let owed = ReservationGuard::unanswered(shared.clone(), unanswered);
                        match on_error {
                            OnRedisError::FailOpen => local().map(|(hold, status)| match hold {
                                TokenHold::Local(local) => {
                                    (TokenHold::FailedOpen { local, owed }, status)
                                }
                                other => (other, status),
                            }),
                            OnRedisError::FailClosed => Err(unavailable(0)),
                        }
                    }
                }
            }
        };
        Some(result)
    }

    /// Keeps a token reservation in `ctx` with its `x-ratelimit-*-tokens` headers, or turns
    /// a refusal into the error to answer.
    pub(super) fn hold_tokens(
        &self,
        ctx: &mut RequestCtx,
        result: Option<Result<(TokenHold, RateStatus), Limited>>,
    ) -> Result<(), GatewayError> {
        match result {
            None => Ok(()),
            Some(Ok((hold, status))) => {
                push_headers(ctx, "tokens", &status);
                ctx.tokens = Some(hold);
                ctx.track_usage = true;
                Ok(())
            }
            Some(Err(limited)) => Err(self.refuse(ctx, &limited)),
        }
    }

    /// Replaces a token reservation's estimate with what the request used.
    pub(super) async fn settle_tokens(&self, hold: TokenHold, actual: u64) {
        match (hold, self.shared()) {
            (TokenHold::Local(r), _) => r.settle(actual),
            (TokenHold::Shared(mut guard), Some(shared)) => {
                if let Some(r) = guard.take() {
                    if let Err(e) = Box::pin(shared.settle_tokens(&r, actual)).await {
                        self.redis_failed(&e);
                        shared.settle_tokens_later(r, actual);
                    }
                }
            }
            (TokenHold::FailedOpen { local, owed }, _) => {
                local.settle(actual);
                // Used while Redis could not be asked: the fleet's windows are charged once it
                // answers, so their totals still equal what was used.
                owed.owe(actual);
            }
            (TokenHold::Shared(_), None) => {}
        }
    }

    /// A refusal: the limit's headers, `Retry-After`, the metric, and the error to write.
    pub(super) fn refuse(&self, ctx: &mut RequestCtx, limited: &Limited) -> GatewayError {
        let kind = match limited.reason {
            LimitReason::Tokens => "tokens",
            _ => "requests",
        };
        push_headers(ctx, kind, &limited.status);
        ctx.response_headers.push((
            http::header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(limited.retry_after)),
        ));
        self.metrics
            .rate_limited
            .with_label_values(&[ctx.key_label(), limited.reason.label()])
            .inc();
        GatewayError::RateLimited(limited.reason)
    }
}

/// The refusal used while Redis is down and `on_redis_error: fail_closed`.
fn unavailable(limit: u32) -> Limited {
    Limited::for_a_second(limit, LimitReason::Unavailable)
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
fn push_headers(ctx: &mut RequestCtx, kind: &'static str, status: &RateStatus) {
    let reset = HeaderValue::from_str(&format_reset(status.reset_after))
        .unwrap_or(HeaderValue::from_static("0ms"));
    // Names parsed at compile time (a name parsed per request shows in a profile).
    const TOKENS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ];
    const REQUESTS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ];
    let [limit, remaining, reset_name] = match kind {
        "tokens" => TOKENS,
        _ => REQUESTS,
    };
    // Several limits (key, route) may apply: report the tightest, as one set of headers.
    let current = ctx
        .response_headers
        .iter()
        .find(|(k, _)| *k == remaining)
        .and_then(|(_, v)| v.to_str().ok()?.parse::<u32>().ok());
    if current.is_some_and(|c| c <= status.remaining) {
        return;
    }
    ctx.response_headers
        .retain(|(k, _)| *k != limit && *k != remaining && *k != reset_name);
    ctx.response_headers.extend([
        (limit, HeaderValue::from(status.limit)),
        (remaining, HeaderValue::from(status.remaining)),
        (reset_name, reset),
    ]);
}

/// `Retry-After` in whole seconds, rounded up (a client that waits this long is admitted),
/// and never 0 (which some clients read as "retry at once, forever").
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn status(limit: u32, remaining: u32, reset_ms: u64) -> RateStatus {
        RateStatus {
            limit,
            remaining,
            reset_after: Duration::from_millis(reset_ms),
        }
    }

    fn header<'a>(ctx: &'a RequestCtx, name: &str) -> Vec<&'a str> {
        ctx.response_headers
            .iter()
            .filter(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn the_tightest_of_several_limits_is_reported_once() {
        let mut ctx = RequestCtx::new();
        // The key's limit, then a route's tighter one, then a looser one.
        push_headers(&mut ctx, "requests", &status(60, 40, 1000));
        push_headers(&mut ctx, "requests", &status(10, 3, 6000));
        push_headers(&mut ctx, "requests", &status(100, 99, 600));
        assert_eq!(header(&ctx, "x-ratelimit-limit-requests"), ["10"]);
        assert_eq!(header(&ctx, "x-ratelimit-remaining-requests"), ["3"]);
        assert_eq!(header(&ctx, "x-ratelimit-reset-requests"), ["6s"]);
        // Token limits are reported beside request limits, not instead of them.
        push_headers(&mut ctx, "tokens", &status(1000, 900, 60));
        assert_eq!(header(&ctx, "x-ratelimit-remaining-tokens"), ["900"]);
        assert_eq!(header(&ctx, "x-ratelimit-remaining-requests"), ["3"]);
        // A tie keeps the first (no flapping between equal limits).
        push_headers(&mut ctx, "tokens", &status(2000, 900, 60));
        assert_eq!(header(&ctx, "x-ratelimit-limit-tokens"), ["1000"]);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(59_999)), 60);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }
}
