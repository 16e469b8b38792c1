//! Sending a request to a provider and streaming its answer back to the client.
//!
//! We own this loop instead of letting Pingora's proxy phases drive it (DESIGN.md, step 11):
//! Pingora replays a request body only from a 64 KiB retry buffer and commits to an upstream
//! once its response head is read, while LLM prompts are often larger and falling back after a
//! 429/503 is the point of a gateway. Here the body is already in memory (read once, bounded),
//! each attempt writes its own rewritten copy through a pooled connection (`pool.rs`: new ones
//! from Pingora's `Connector`, idle ones kept by us), and only a response we accept is written
//! downstream, chunk by chunk as it arrives (SSE is never buffered).
//!
//! On the request path: no panics (the lints below are denied; tests may unwrap).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
//!
//! | file | what it does |
//! |---|---|
//! | `mod.rs` | the attempt loop: target order, retries and fallback, backoff, deadline |
//! | `attempt.rs` | one attempt up to the commit point |
//! | `stream.rs` | from the commit point: the answer to the client, chunk by chunk |
//! | `watch.rs` | what sees the answer on its way: cache fill, capture, usage tap and strip |
//! | `request.rs` | the provider's request head (and writing it) and the client's response head |
//! | `answer.rs` | the provider's HTTP/1.1 answer read: head, body framing, reuse of the connection |
//! | `pool.rs` | connections to providers: new ones, and the idle ones kept for reuse |
//! | `ready.rs` | polling a read once without waiting (batching chunks, checking an idle connection) |
//! | `translate.rs` | a streamed answer translated event by event for a client of another API |
//! | `adapt.rs` | the answer of a provider of another API (`api: anthropic`) made a chat answer first |
//! | `error.rs` | [`ForwardError`] and the mapping of transport errors |
//!
//! Imports: `upstream` (health, quotas, providers), `routing`, the request's `ctx`, and the
//! cache's `Fill` (a watcher); nothing else of `proxy`.

mod adapt;
mod answer;
mod attempt;
mod error;
mod hedge;
mod pool;
mod ready;
mod request;
mod stream;
mod translate;
mod watch;

use std::time::{Duration, Instant};

use crate::session::Session;
use http::header::CONTENT_LENGTH;
use http::{HeaderName, HeaderValue};

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::openai::{LlmRequest, DEFAULT_COMPLETION_TOKENS};
use crate::proxy::ctx::{add_headers, RequestCtx};
use crate::routing::affinity::Conversation;
use crate::routing::balance::{self, NoTarget, TargetState};
use crate::routing::Route;
use crate::upstream::health::{Outcome, Permit};
pub use attempt::Upstreams;
use attempt::{attempt, record, Attempt, Failed, Try};
use error::is_openai_error;
pub use error::{sse_error_event, ForwardError};
use pool::Connections;
pub use stream::Settle;
pub use translate::TranslatedStream;
pub use watch::{Captured, Watchers};

/// Idle keep-alive connections kept across all providers. Many concurrent streams finish at
/// once; a small pool would close most of their connections only to reopen them.
const UPSTREAM_POOL_SIZE: usize = 1024;

/// Longest a batch's line waits for room kept for interactive requests; then it takes its turn
/// in the target's queue like any request.
const BATCH_YIELD_MAX: Duration = Duration::from_secs(60);

/// The upstream side: a pool of keep-alive connections shared by all requests.
pub struct Forwarder {
    connections: Connections,
    /// What hedged routes learnt (by route name: it outlives reloads).
    hedging: crate::routing::hedge::Hedging,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder::new()
    }
}

impl Forwarder {
    pub fn new() -> Forwarder {
        Forwarder {
            connections: Connections::new(UPSTREAM_POOL_SIZE),
            hedging: Default::default(),
        }
    }

    /// Sends `req` to the route's targets, in the order its strategy and their health give,
    /// until one answers or the route's attempts or deadline run out, and streams the answer
    /// to the client. Until the first byte is written the request can move on to another
    /// target (DESIGN.md step 11); after it, a failure ends the stream with an error event.
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: &LlmRequest,
        route: &Route,
        up: &Upstreams<'_>,
        watch: &mut Watchers,
    ) -> Result<(), ForwardError> {
        let states: Vec<TargetState> = route
            .targets
            .iter()
            .map(|t| {
                let provider = up.health.get(&t.provider.name);
                let model = provider.model(&t.health_key);
                TargetState { provider, model }
            })
            .collect();
        // A batch's line yields to interactive requests: it waits (a bounded while, so a
        // batch is never starved) until a target has room beyond what is kept for them.
        let mut started = ctx.started;
        if ctx.batch_line {
            let share = ctx
                .config
                .as_ref()
                .map_or(0.5, |c| c.batches.capacity_share);
            let waiting = Instant::now();
            while waiting.elapsed() < BATCH_YIELD_MAX
                && !balance::room_for_batch(route, &states, up.health, share)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The route's deadline counts from when the line stopped yielding.
            started = Instant::now();
        }
        let estimate = req.token_estimate(DEFAULT_COMPLETION_TOKENS);
        ctx.prompt_estimate = req.token_split(0).0;
        let conversation = if route.prefix_affinity {
            crate::routing::affinity::conversation(&req.raw)
        } else {
            Conversation::default()
        };
        // A hedged route learns its times to first byte and counts its requests (its budget).
        // (Batch lines are never hedged, nor counted: they would pay for interactive hedges.)
        let learnt = route
            .hedge
            .as_ref()
            .filter(|_| !ctx.batch_line)
            .map(|_| self.hedging.route(&route.name));
        if let Some(learnt) = &learnt {
            learnt.note_request();
        }
        let mut order = match balance::order(route, &states, up.health, estimate, &conversation) {
            Ok(order) => order,
            Err(none) => return Err(self.no_target(ctx, route, &none, up.metrics)),
        };
        if ctx.batch_line {
            let share = ctx
                .config
                .as_ref()
                .map_or(0.5, |c| c.batches.capacity_share);
            balance::batch_order(route, &states, share, &mut order);
        }
        let policy = &route.retry;
        let deadline = policy.deadline.and_then(|d| started.checked_add(d));
        let mut tried = vec![0u32; route.targets.len()];
        let mut cursor: usize = 0;
        let mut last: Option<Failed> = None;
        let mut previous: Option<usize> = None;
        // Each pass either starts an attempt or marks a target unavailable; bound it anyway.
        let passes = (policy.attempts as usize)
            .saturating_add(2)
            .saturating_mul(route.targets.len().max(1));
        // A request no target can take (their providers' APIs cannot carry it) is the client's
        // error; a target that cannot take it is passed over.
        let unsuited = |t: &crate::routing::Target| request::unsuited(req, t);
        if route.targets.iter().all(|t| unsuited(t).is_some()) {
            if let Some(e) = route.targets.first().and_then(unsuited) {
                return Err(ForwardError::BeforeResponse(GatewayError::Request(
                    crate::error::RequestError::Translate(e),
                )));
            }
        }
        for _ in 0..passes {
            if ctx.attempts >= policy.attempts {
                break;
            }
            // The next target in plan order that is still available: an earlier attempt may
            // have opened a circuit or met a Retry-After since the plan was made. (`order`
            // holds indexes of `route.targets`, which `states` and `tried` mirror.)
            let now_ms = up.health.now_ms();
            let Some((k, i, target, state)) = (0..order.len())
                .filter_map(|k| {
                    let k = cursor.wrapping_add(k).checked_rem(order.len())?;
                    let i = *order.get(k)?;
                    Some((k, i, route.targets.get(i)?, states.get(i)?))
                })
                .find(|(_, _, target, state)| {
                    let circuit = &target.provider.circuit;
                    unsuited(target).is_none()
                        && state
                            .provider
                            .availability(&state.model, now_ms, circuit)
                            .is_ok()
                })
            else {
                break;
            };
            cursor = k.saturating_add(1);
            let Some(tries) = tried.get_mut(i) else {
                break;
            };
            if *tries > 0 {
                // Trying a target again: back off first (a fallback to a new target does not).
                let pause = policy.backoff(*tries);
                let resume = Instant::now().checked_add(pause);
                if deadline.is_some_and(|d| resume.is_none_or(|r| r >= d)) {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let Some((mut permit, mut quota)) = hedge::arm(target, state, up).await else {
                continue;
            };
            let provider = &*target.provider;
            ctx.attempts = ctx.attempts.saturating_add(1);
            if let Some(tries) = tried.get_mut(i) {
                *tries = tries.saturating_add(1);
            }
            if let (Some(failed), Some(prev)) = (&last, previous) {
                up.metrics
                    .retries
                    .with_label_values(&[route.name.as_str(), failed.failure.label()])
                    .inc();
                if let Some(from) = route.targets.get(prev).filter(|_| prev != i) {
                    up.metrics
                        .fallbacks
                        .with_label_values(&[&route.name, &from.provider.name, &provider.name])
                        .inc();
                }
            }
            previous = Some(i);
            ctx.provider = Some(provider.name.clone());
            // Priced as this request's config has it (a reload never reprices a request in
            // flight).
            ctx.price = ctx
                .config
                .as_ref()
                .and_then(|c| c.routes.price(target, &req.model));
            // The circuit learns the outcome at the commit point (a half-open trial must not
            // wait for a long stream to end), or when the attempt fails.
            crate::proxy::faults::maybe_panic(session.req_header(), "attempt");
            ctx.attempt_started = Some(Instant::now());
            let mut t = Try {
                connections: &self.connections,
                target,
                state,
                policy,
                deadline,
            };
            let hedged = learnt.as_ref().zip(route.hedge.as_ref()).filter(|(_, h)| {
                // The first attempt only, never a batch's line; a first target of known
                // capacity (a sidecar) only while requests queue on it.
                ctx.attempts == 1
                    && !ctx.batch_line
                    && state
                        .provider
                        .capacity(target.provider.max_in_flight)
                        .is_none_or(|cap| {
                            state.provider.in_flight() >= cap.saturating_add(h.min_queue)
                        })
            });
            let attempt = match hedged {
                None => {
                    watch.in_flight(state.provider.enter());
                    let attempt = attempt(session, ctx, req, &t, &mut permit, up, watch).await;
                    // A hedged route learns its first targets' times to first byte.
                    if let (Some(learnt), Some(first_byte), 1) =
                        (&learnt, ctx.first_byte, ctx.attempts)
                    {
                        learnt.observe_ttft(first_byte);
                    }
                    attempt
                }
                Some((learnt, policy)) => {
                    let primary = hedge::Racer {
                        index: i,
                        t,
                        permit,
                        quota,
                        in_flight: Some(state.provider.enter()),
                        price: ctx.price,
                    };
                    let candidates = hedge::Candidates {
                        route,
                        states: &states,
                        left: (1..order.len())
                            .filter_map(|d| order.get(k.wrapping_add(d).checked_rem(order.len())?))
                            .copied()
                            .filter(|&j| j != i)
                            .collect(),
                        like: t,
                        req,
                        config: ctx.config.clone(),
                    };
                    let race = hedge::Race {
                        policy,
                        learnt,
                        route: &route.name,
                    };
                    let raced = Box::pin(hedge::race(
                        session, ctx, req, primary, candidates, race, up, watch,
                    ))
                    .await;
                    let racer = raced.racer;
                    // Hedges are attempts of the request (counted in `ctx` as they started), on
                    // their targets.
                    for j in raced.hedged {
                        if let Some(tries) = tried.get_mut(j) {
                            *tries = tries.saturating_add(1);
                        }
                    }
                    // The attempt that answered (or failed last) is settled below like any.
                    (t, permit, quota) = (racer.t, racer.permit, racer.quota);
                    previous = Some(racer.index);
                    ctx.provider = Some(t.target.provider.name.clone());
                    if let Some(in_flight) = racer.in_flight {
                        watch.in_flight(in_flight);
                    }
                    raced.attempt
                }
            };
            let (target, state) = (t.target, t.state);
            let provider = &*target.provider;
            // Given back already when the answer arrived whole; else now.
            watch.answered();
            if let Some(started) = ctx.attempt_started.take() {
                let streamed = ctx.committed_at.map_or(Duration::ZERO, |t| t.elapsed());
                ctx.upstream_wait = ctx
                    .upstream_wait
                    .saturating_add(started.elapsed().saturating_sub(streamed));
            }
            match attempt {
                Attempt::Committed { label, result } => {
                    // This target read the conversation: its next turn should come back here
                    // (not to a target that was tried first and failed).
                    if let Some(&whole) = conversation.chain.last() {
                        state.provider.prefixes.note_sent(whole);
                    }
                    if label == "ok" {
                        let series = provider
                            .series
                            .get(up.metrics, |m| m.provider_series(&provider.name));
                        series.attempts_ok.inc();
                    } else {
                        up.metrics
                            .attempts
                            .with_label_values(&[provider.name.as_str(), label])
                            .inc();
                    }
                    if let Err(ForwardError::AfterResponse { .. }) = &result {
                        // Counts against the circuit like any failure (no trial any more).
                        record(up, &t, Permit { trial: false }, Outcome::Failure);
                    }
                    // A committed answer costs what the provider reported; without a report,
                    // what was streamed (estimated). The reservation's estimate is never
                    // charged: a client's `max_tokens` must not drain a provider's quota.
                    let used = ctx.usage_total.or(ctx.usage_estimate).unwrap_or(0);
                    up.quotas.settle(quota, used).await;
                    return result;
                }
                Attempt::Failed(failed) => {
                    up.metrics
                        .attempts
                        .with_label_values(&[provider.name.as_str(), failed.failure.label()])
                        .inc();
                    let outcome = if failed.failure.is_provider_fault() {
                        Outcome::Failure
                    } else {
                        Outcome::Neutral
                    };
                    if let Some(permit) = permit.take() {
                        record(up, &t, permit, outcome);
                    }
                    state.provider.set_error(failed.error.to_string());
                    up.quotas.settle(quota, 0).await;
                    let again = policy.retries(failed.failure);
                    last = Some(failed);
                    if !again {
                        break;
                    }
                }
            }
        }
        // Boxed: the error path's writes need not be part of every request's future.
        Box::pin(self.give_up(session, ctx, route, last, &states, up)).await
    }

    /// No attempt succeeded: the client gets the last failure (the provider's own error answer
    /// when there was one), or 503 when no target could even be tried.
    async fn give_up(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
        last: Option<Failed>,
        states: &[TargetState],
        up: &Upstreams<'_>,
    ) -> Result<(), ForwardError> {
        ctx.response_headers.push((
            HeaderName::from_static("x-lumen-attempts"),
            HeaderValue::from(ctx.attempts),
        ));
        let Some(failed) = last else {
            let none = match balance::order(route, states, up.health, 0, &Conversation::default()) {
                Err(none) => none,
                // Everything was available but busy with trials or quotas a moment ago.
                Ok(_) => NoTarget {
                    reasons: Vec::new(),
                    retry_after_ms: 1000,
                },
            };
            return Err(self.no_target(ctx, route, &none, up.metrics));
        };
        ctx.error = Some(failed.error.to_string());
        // The provider's own error is passed on when it is an OpenAI-shaped JSON error (it
        // says most, e.g. which limit was hit); anything else (an HTML page from a CDN) is
        // replaced by ours.
        let Some((mut head, body)) = failed.answer.filter(|(_, body)| is_openai_error(body)) else {
            return Err(ForwardError::BeforeResponse(failed.error.into()));
        };
        // A Messages client gets it in Anthropic's shape.
        let body = if ctx.anthropic {
            let error = crate::translate::messages::error_from_openai(head.status.as_u16(), &body);
            bytes::Bytes::from(serde_json::to_vec(&error).unwrap_or_default())
        } else {
            body
        };
        head.remove_header(&http::header::TRANSFER_ENCODING);
        let _ = head.insert_header(CONTENT_LENGTH, body.len());
        add_headers(&mut head, &ctx.response_headers);
        if let Some(provider) = &ctx.provider {
            let _ = head.insert_header("x-lumen-provider", provider.as_str());
        }
        ctx.status = head.status.as_u16();
        if session.write_response_header(head, false).await.is_err()
            || session.write_response_body(Some(body), true).await.is_err()
        {
            return Err(ForwardError::ClientGone);
        }
        Ok(())
    }

    fn no_target(
        &self,
        ctx: &mut RequestCtx,
        route: &Route,
        none: &NoTarget,
        metrics: &Metrics,
    ) -> ForwardError {
        metrics.no_target.with_label_values(&[&route.name]).inc();
        let secs = none.retry_after_ms.div_ceil(1000).max(1);
        ctx.response_headers
            .push((http::header::RETRY_AFTER, HeaderValue::from(secs)));
        ForwardError::BeforeResponse(GatewayError::NoTarget {
            route: route.name.clone(),
            detail: none.describe(),
        })
    }
}
