//! Sending a request to a provider and streaming its answer back to the client.
//!
//! We own this loop instead of letting Pingora's proxy phases drive it (DESIGN.md, step 8):
//! Pingora replays a request body only from a 64 KiB retry buffer and commits to an upstream
//! once its response head is read, while LLM prompts are often larger and falling back after a
//! 429/503 is the point of a gateway. Here the body is already in memory (read once, bounded),
//! each attempt writes its own rewritten copy through a pooled connection from Pingora's
//! `Connector`, and only a response we accept is written downstream, chunk by chunk as it
//! arrives (SSE is never buffered).
//!
//! On the request path: no panics (the lints below are denied; tests may unwrap).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::error::{GatewayError, UpstreamError};
use crate::metrics::Metrics;
use crate::openai::{body_with_usage, LlmRequest, DEFAULT_COMPLETION_TOKENS};
use crate::proxy::ctx::RequestCtx;
use crate::routing::balance::{self, NoTarget, TargetState};
use crate::routing::{Route, Target};
use crate::upstream::health::quota::{read_provider_limits, Quotas};
use crate::upstream::health::{HealthTable, Outcome, Permit, TargetHealth};
use crate::upstream::provider::Provider;
use crate::upstream::retry::{Failure, RetryPolicy};
use crate::usage::{UsageStrip, UsageTap};

/// How a forward failed, which decides who writes what to the client.
#[derive(Debug)]
pub enum ForwardError {
    /// Nothing reached the client yet: the pipeline answers with this error.
    BeforeResponse(GatewayError),
    /// The response head (and maybe part of the body) went out, then the upstream failed. For
    /// SSE an error event was written and the stream closed cleanly; otherwise the connection
    /// must be dropped so the truncation is visible.
    AfterResponse { error: UpstreamError, sse: bool },
    /// The client went away; the upstream connection is dropped so generation stops.
    ClientGone,
    /// The node is shutting down and its grace period is ending: the stream was ended with a
    /// `server_shutting_down` event (says nothing about the provider).
    ShuttingDown,
}

/// Request headers never passed on to a provider: hop-by-hop headers, headers we set
/// ourselves, and the client's credentials (the gateway authenticates clients; providers only
/// ever see the provider key).
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "authorization",
    "x-api-key",
    // A worker's one-time job token: for this process only.
    "x-lumen-job-token",
    "api-key",
    "cookie",
    "openai-organization",
    "openai-project",
    "x-goog-api-key",
    "x-request-id",
    // We read usage from responses, so ask for them uncompressed.
    "accept-encoding",
    // `Expect: 100-continue` is answered at the edge (the body is already read): a provider's
    // interim `100 Continue` must never be taken for its answer.
    "expect",
];

/// Response headers passed from a provider to the client: what describes the answer itself.
/// Everything else (cookies, `server`, the provider's organisation, its `x-ratelimit-*` for our
/// provider key, framing of its connection to us) stays behind: the client's rate-limit
/// headers are Lumen's own, set once.
const RETURNED: &[&str] = &[
    "content-type",
    "content-encoding",
    "cache-control",
    "retry-after",
    "retry-after-ms",
    "openai-processing-ms",
    "openai-version",
];

/// The provider's own request id, returned under this name (for support tickets with the
/// provider); `x-request-id` is Lumen's.
const UPSTREAM_REQUEST_ID: &str = "x-lumen-upstream-request-id";

/// Idle keep-alive connections kept across all providers. Many concurrent streams finish at
/// once; a small pool would close most of their connections only to reopen them.
const UPSTREAM_POOL_SIZE: usize = 1024;

/// A provider's error answer is kept up to this size so that, if no other target answers, the
/// client gets it as the last error.
const MAX_ERROR_BODY: usize = 256 * 1024;

/// The upstream side: a pool of keep-alive connections shared by all requests.
pub struct Forwarder {
    connector: Connector,
}

/// The shared state an attempt loop reads and feeds.
pub struct Upstreams<'a> {
    pub health: &'a HealthTable,
    pub quotas: &'a Quotas,
    pub metrics: &'a Metrics,
    /// Shutdown: streams still open when the grace period ends are ended cleanly.
    pub drain: &'a crate::drain::Drain,
}

/// One attempt that ended before anything reached the client.
struct Failed {
    failure: Failure,
    error: UpstreamError,
    /// The provider's own error answer (429/5xx), passed on if it is the last one.
    answer: Option<(Box<ResponseHeader>, Bytes)>,
}

/// How one attempt ended.
enum Attempt {
    /// A response went to the client: the request is over, whatever `result` says.
    Committed {
        /// How the attempt ended, for `lumen_upstream_attempts_total`.
        label: &'static str,
        result: Result<(), ForwardError>,
    },
    /// Nothing reached the client: another attempt may follow.
    Failed(Failed),
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder::new()
    }
}

impl Forwarder {
    pub fn new() -> Forwarder {
        Forwarder {
            connector: Connector::new(Some(ConnectorOptions::new(UPSTREAM_POOL_SIZE))),
        }
    }

    /// Sends `req` to the route's targets, in the order its strategy and their health give,
    /// until one answers or the route's attempts or deadline run out, and streams the answer
    /// to the client. Until the first byte is written the request can move on to another
    /// target (DESIGN.md step 8); after it, a failure ends the stream with an error event.
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: &LlmRequest,
        route: &Route,
        up: &Upstreams<'_>,
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
        let estimate = req.token_estimate(DEFAULT_COMPLETION_TOKENS);
        ctx.prompt_estimate = req.token_estimate(0);
        let order = match balance::order(route, &states, up.health, estimate) {
            Ok(order) => order,
            Err(none) => return Err(self.no_target(ctx, route, &none, up.metrics)),
        };
        let policy = &route.retry;
        let deadline = policy.deadline.and_then(|d| ctx.started.checked_add(d));
        let mut tried = vec![0u32; route.targets.len()];
        let mut cursor: usize = 0;
        let mut last: Option<Failed> = None;
        let mut previous: Option<usize> = None;
        // Each pass either starts an attempt or marks a target unavailable; bound it anyway.
        let passes = (policy.attempts as usize)
            .saturating_add(2)
            .saturating_mul(route.targets.len().max(1));
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
                    state
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
            let provider = &*target.provider;
            let circuit = &state.model.circuit;
            let Some(permit) = circuit.acquire(up.health.now_ms(), &provider.circuit) else {
                continue;
            };
            // From here the permit is held by a guard: a half-open trial that never reports
            // (a panic, a dropped future) is handed back, so the circuit cannot stay stuck.
            let mut permit = PermitGuard::new(permit, &state.model);
            let quota = match up
                .quotas
                .take(&provider.quota, &state.provider, up.health)
                .await
            {
                Ok(hold) => hold,
                Err(_) => {
                    if let Some(permit) = permit.take() {
                        circuit.record(permit, Outcome::Neutral, 0, &provider.circuit);
                    }
                    continue;
                }
            };
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
            let in_flight = state.provider.enter();
            // The circuit learns the outcome at the commit point (a half-open trial must not
            // wait for a long stream to end), or when the attempt fails.
            crate::proxy::faults::maybe_panic(session.req_header(), "attempt");
            ctx.attempt_started = Some(Instant::now());
            let attempt = self
                .attempt(
                    session,
                    ctx,
                    req,
                    (target, state),
                    &mut permit,
                    policy,
                    deadline,
                    up,
                )
                .await;
            drop(in_flight);
            if let Some(started) = ctx.attempt_started.take() {
                let streamed = ctx.committed_at.map_or(Duration::ZERO, |t| t.elapsed());
                ctx.upstream_wait = ctx
                    .upstream_wait
                    .saturating_add(started.elapsed().saturating_sub(streamed));
            }
            match attempt {
                Attempt::Committed { label, result } => {
                    up.metrics
                        .attempts
                        .with_label_values(&[provider.name.as_str(), label])
                        .inc();
                    if let Err(ForwardError::AfterResponse { .. }) = &result {
                        // Counts against the circuit like any failure (no trial any more).
                        record(
                            up,
                            (target, state),
                            Permit { trial: false },
                            Outcome::Failure,
                        );
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
                        record(up, (target, state), permit, outcome);
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
        self.give_up(session, ctx, route, last, &states, up).await
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
            let none = match balance::order(route, states, up.health, 0) {
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

    /// One attempt on one target. Commits (writes to the client) only once the provider's
    /// answer is known good enough to pass on: a success whose first chunk arrived, or a
    /// status the route does not retry.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: &LlmRequest,
        (target, state): (&Target, &TargetState),
        permit: &mut PermitGuard,
        policy: &RetryPolicy,
        deadline: Option<Instant>,
        up: &Upstreams<'_>,
    ) -> Attempt {
        let provider = &*target.provider;
        let failed = |failure: Failure, error: UpstreamError| {
            Attempt::Failed(Failed {
                failure,
                error,
                answer: None,
            })
        };
        // Streams always ask for the usage chunk (budgets, quotas and the ledger settle on
        // it, whatever the client set); the client sees it only if it asked.
        ctx.strip_usage = crate::openai::adds_usage(req);
        let body = body_with_usage(req, target.model_json.as_ref());
        let head =
            match upstream_request(session.req_header(), provider, req, &body, &ctx.request_id) {
                Ok(head) => head,
                Err(e) => {
                    if let Some(permit) = permit.take() {
                        record(up, (target, state), permit, Outcome::Neutral);
                    }
                    return Attempt::Committed {
                        label: "internal",
                        result: Err(ForwardError::BeforeResponse(e)),
                    };
                }
            };
        let sent = Instant::now();
        let Ok(peer) = provider.peer.peer().await else {
            return failed(Failure::Connect, connect_error(provider));
        };
        let exchange = self.exchange(provider, &peer, head, &body);
        // A client that leaves while the provider thinks is noticed now, not when the answer
        // comes: the provider's connection is dropped, so generation (and billing) stops.
        let gone = || Attempt::Committed {
            label: "client_gone",
            result: Err(ForwardError::ClientGone),
        };
        let exchanged = tokio::select! {
            exchanged = within(deadline, exchange) => exchanged,
            () = client_gone(session) => return gone(),
        };
        let mut upstream = match exchanged {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => return failed(failure_of(&e), e),
            Err(()) => return failed(Failure::Timeout, timeout_error(provider)),
        };
        let Some(upstream_head) = upstream.response_header() else {
            return failed(Failure::Dropped, protocol_error(provider));
        };
        let status = upstream_head.status.as_u16();
        read_provider_limits(status, &upstream_head.headers, &state.model, up.health);
        // Our own head in our own HTTP version, with the provider's answer headers only.
        let head = match client_head(upstream_head) {
            Ok(head) => head,
            Err(_) => return failed(Failure::Dropped, protocol_error(provider)),
        };

        // A status this route retries: keep the answer (it is the last error if nothing else
        // answers) and let the loop try again.
        if status >= 400 && policy.retries(Failure::Status(status)) {
            let answer = match within(deadline, read_all(&mut upstream, MAX_ERROR_BODY)).await {
                Ok(Ok(body)) => {
                    self.connector
                        .release_http_session(upstream, &*peer, Some(provider.idle_timeout))
                        .await;
                    Some((head, body))
                }
                _ => None,
            };
            return Attempt::Failed(Failed {
                failure: Failure::Status(status),
                error: UpstreamError::Status {
                    provider: provider.name.clone(),
                    status,
                },
                answer,
            });
        }

        // Success (or a status passed on as is): wait for the first real chunk before
        // committing, so a stream that dies before its first event still falls back. SSE
        // comments (`: processing`) some providers send first are held with it.
        let sse = head
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut first = BytesMut::new();
        loop {
            let read = tokio::select! {
                read = within(deadline, upstream.read_response_body()) => read,
                () = client_gone(session) => return gone(),
            };
            match read {
                Ok(Ok(Some(chunk))) => {
                    first.extend_from_slice(&chunk);
                    if !(sse && only_comments(&first)) {
                        break;
                    }
                }
                // A success with nothing in it is no answer.
                Ok(Ok(None)) if (200..300).contains(&status) => {
                    return failed(Failure::Dropped, protocol_error(provider))
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    let e = classify(provider, &e);
                    return failed(failure_of(&e), e);
                }
                Err(()) => return failed(Failure::Timeout, timeout_error(provider)),
            }
        }
        let first = (!first.is_empty()).then(|| first.freeze());
        let first_byte = sent.elapsed();
        ctx.first_byte = Some(first_byte);
        up.metrics
            .first_byte
            .with_label_values(&[&provider.name])
            .observe(first_byte.as_secs_f64());
        // Any answer is a latency sample: a target that only fails must not look unmeasured.
        state.model.observe_latency(first_byte);
        let (outcome, label) = match status {
            200..=399 => (Outcome::Success, "ok"),
            429 => (Outcome::Failure, "status_429"),
            500.. => (Outcome::Failure, "status_5xx"),
            _ => (Outcome::Neutral, "status_4xx"),
        };
        if let Some(permit) = permit.take() {
            record(up, (target, state), permit, outcome);
        }
        let result = self
            .stream_to_client(session, ctx, upstream, head, first, &peer, provider, up)
            .await;
        up.metrics
            .upstream_duration
            .with_label_values(&[&provider.name])
            .observe(sent.elapsed().as_secs_f64());
        let label = match &result {
            Err(ForwardError::AfterResponse { .. }) => "failed_mid_response",
            _ => label,
        };
        Attempt::Committed { label, result }
    }

    /// The commit point: writes the response head and the first chunk, then streams the rest
    /// as it arrives. Whatever way it ends, the usage the provider reported (or, for a stream
    /// cut short, an estimate of what was generated) is left in `ctx` for settling.
    #[allow(clippy::too_many_arguments)]
    async fn stream_to_client(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        upstream: HttpSession,
        mut head: Box<ResponseHeader>,
        first: Option<Bytes>,
        peer: &HttpPeer,
        provider: &Provider,
        up: &Upstreams<'_>,
    ) -> Result<(), ForwardError> {
        let sse = head
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if sse {
            // Stripping the usage chunk changes the length: a stream is always chunked.
            head.remove_header(&CONTENT_LENGTH);
            let _ = head.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        add_headers(&mut head, &ctx.response_headers);
        let _ = head.insert_header("x-lumen-provider", provider.name.as_str());
        let _ = head.insert_header("x-lumen-attempts", ctx.attempts);
        let _ = head.insert_header("x-lumen-overhead-us", ctx.overhead().as_micros() as u64);
        ctx.committed_at = Some(Instant::now());
        ctx.status = head.status.as_u16();
        ctx.stream = sse;
        if let Some(fill) = ctx.fill.as_mut() {
            fill.head(ctx.status, sse, &provider.name);
        }
        // Usage is read off every success: for token budgets and quotas, metrics and the usage
        // ledger.
        let mut tap = (ctx.status < 300).then(|| UsageTap::new(sse));
        let result = self
            .pump(
                session, ctx, upstream, head, first, peer, provider, up, &mut tap,
            )
            .await;
        if let Some(tap) = tap.as_mut() {
            ctx.usage_total = tap.total_tokens();
            ctx.usage_split = tap.split();
            if ctx.usage_total.is_none() {
                ctx.usage_estimate = Some(ctx.prompt_estimate.saturating_add(tap.estimate()));
            }
        }
        result
    }

    /// Copies the provider's answer to the client (or into the capture), chunk by chunk. A
    /// stream must end with `data: [DONE]`: one that ends without it was cut, and ends with an
    /// error event like any other broken stream (never cached, counted as failed).
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut upstream: HttpSession,
        head: Box<ResponseHeader>,
        first: Option<Bytes>,
        peer: &HttpPeer,
        provider: &Provider,
        up: &Upstreams<'_>,
        tap: &mut Option<UsageTap>,
    ) -> Result<(), ForwardError> {
        let sse = ctx.stream;
        // Captured (the pipeline rewrites the answer, e.g. merging cached embeddings): nothing
        // goes to the client from here.
        let capture = ctx.capture.is_some();
        if let Some(captured) = ctx.capture.as_mut() {
            captured.head = Some(head);
        } else if session.write_response_header(head, false).await.is_err() {
            return Err(ForwardError::ClientGone);
        }
        // The usage chunk Lumen asked for on the client's behalf is not the client's to see.
        let mut strip = (sse && ctx.strip_usage).then(UsageStrip::default);
        let mut done = DoneWatch::default();
        // One wait on the shutdown signal for the whole stream, not one per chunk.
        let cut = up.drain.cut();
        tokio::pin!(cut);
        let mut next = first;
        let mut ends_event = true;
        loop {
            let Some(chunk) = next.take() else {
                break;
            };
            if let Some(tap) = tap.as_mut() {
                tap.observe(&chunk);
            }
            if sse {
                done.observe(&chunk);
            }
            if let Some(fill) = ctx.fill.as_mut() {
                fill.chunk(&chunk);
            }
            let chunk = match strip.as_mut() {
                Some(strip) => strip.filter(chunk),
                None => chunk,
            };
            if !chunk.is_empty() {
                ends_event = chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n");
            }
            if chunk.is_empty() && strip.is_some() {
                // Held back (part of an event) or stripped: nothing to write.
            } else if let Some(captured) = ctx.capture.as_mut() {
                if captured.body.len().saturating_add(chunk.len()) > captured.limit {
                    return Err(ForwardError::BeforeResponse(GatewayError::Internal(
                        "provider answer too large to merge".into(),
                    )));
                }
                captured.body.extend_from_slice(&chunk);
            } else if session
                .write_response_body(Some(chunk), false)
                .await
                .is_err()
            {
                return Err(ForwardError::ClientGone);
            }
            let read = tokio::select! {
                read = upstream.read_response_body() => read,
                () = &mut cut, if sse && !capture => {
                    // Shutting down: end the stream while the client can still be told why.
                    let mut event = if ends_event {
                        BytesMut::new()
                    } else {
                        BytesMut::from(&b"\n\n"[..])
                    };
                    event.extend_from_slice(b"data: ");
                    event.extend_from_slice(&GatewayError::ShuttingDown.body());
                    event.extend_from_slice(b"\n\n");
                    let _ = session.write_response_body(Some(event.freeze()), true).await;
                    return Err(ForwardError::ShuttingDown);
                }
            };
            match read {
                Ok(chunk) => next = chunk,
                Err(e) => {
                    let error = classify(provider, &e);
                    let broken = self
                        .broken(session, provider, up, error, sse && !capture, ends_event)
                        .await;
                    return Err(match broken {
                        // Nothing reached the client: the pipeline reports it.
                        ForwardError::AfterResponse { error, .. } if capture => {
                            ForwardError::BeforeResponse(error.into())
                        }
                        other => other,
                    });
                }
            }
        }
        if sse && !done.seen() {
            // Closed (or chunk-terminated) before `[DONE]`: a truncated stream, not an end.
            let error = protocol_error(provider);
            let pending = strip.as_mut().map(UsageStrip::finish).unwrap_or_default();
            if !capture && !pending.is_empty() {
                ends_event = pending.ends_with(b"\n\n");
                if session
                    .write_response_body(Some(pending), false)
                    .await
                    .is_err()
                {
                    return Err(ForwardError::ClientGone);
                }
            }
            return Err(self
                .broken(session, provider, up, error, !capture, ends_event)
                .await);
        }
        if let Some(rest) = strip
            .as_mut()
            .map(UsageStrip::finish)
            .filter(|r| !r.is_empty())
        {
            if !capture
                && session
                    .write_response_body(Some(rest), false)
                    .await
                    .is_err()
            {
                return Err(ForwardError::ClientGone);
            }
        }
        if !capture && session.write_response_body(None, true).await.is_err() {
            return Err(ForwardError::ClientGone);
        }
        self.connector
            .release_http_session(upstream, peer, Some(provider.idle_timeout))
            .await;
        Ok(())
    }

    /// The provider failed after the answer was committed: counts it, and for a stream sent
    /// to the client ends it with an error event (OpenAI SDKs raise on an `error` object in
    /// the stream), on a fresh line if the provider stopped mid-event.
    async fn broken(
        &self,
        session: &mut Session,
        provider: &Provider,
        up: &Upstreams<'_>,
        error: UpstreamError,
        sse_to_client: bool,
        ends_event: bool,
    ) -> ForwardError {
        up.metrics
            .upstream_errors
            .with_label_values(&[&provider.name, error_kind(&error)])
            .inc();
        if sse_to_client {
            let event = sse_error_event(&error);
            let event = if ends_event {
                event
            } else {
                let mut e = BytesMut::from(&b"\n\n"[..]);
                e.extend_from_slice(&event);
                e.freeze()
            };
            let _ = session.write_response_body(Some(event), true).await;
        }
        ForwardError::AfterResponse {
            error,
            sse: sse_to_client,
        }
    }

    /// Writes the request and reads the response head (skipping interim 1xx answers). A
    /// pooled connection found closed while the request was being written never delivered
    /// it: that one case is retried at once on a fresh connection. Once the request is
    /// written, a failure is an attempt like any other (the provider may have run it).
    async fn exchange(
        &self,
        provider: &Provider,
        peer: &HttpPeer,
        head: RequestHeader,
        body: &[Bytes],
    ) -> Result<HttpSession, UpstreamError> {
        let mut stale_retry_left = true;
        loop {
            let (mut upstream, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| classify(provider, &e))?;
            // Pingora leaves per-read timeouts to the caller: `timeout` bounds the wait for the
            // response head and then for each body chunk.
            upstream.set_read_timeout(Some(provider.timeout));
            upstream.set_write_timeout(Some(provider.timeout));
            match write_request(&mut upstream, head.clone(), body).await {
                Ok(()) => {}
                Err(e) if reused && stale_retry_left && is_stale_connection(&e) => {
                    stale_retry_left = false;
                    continue;
                }
                Err(e) => return Err(classify(provider, &e)),
            }
            read_final_head(&mut upstream)
                .await
                .map_err(|e| classify(provider, &e))?;
            return Ok(upstream);
        }
    }
}

/// Watches a stream for its `data: [DONE]` line, across chunk boundaries.
#[derive(Default)]
struct DoneWatch {
    /// The last bytes of the stream so far (a mark split across chunks is found), never
    /// more than a mark's length: each chunk is scanned once, not copied.
    tail: Vec<u8>,
    seen: bool,
}

impl DoneWatch {
    const MARKS: [&'static [u8]; 2] = [b"data: [DONE]", b"data:[DONE]"];
    const KEEP: usize = 12;

    fn observe(&mut self, chunk: &[u8]) {
        if self.seen {
            return;
        }
        let has = |bytes: &[u8]| {
            Self::MARKS
                .iter()
                .any(|mark| bytes.windows(mark.len()).any(|w| w == *mark))
        };
        // A mark across the boundary: the held tail and the chunk's first bytes.
        let head = chunk.get(..chunk.len().min(Self::KEEP)).unwrap_or_default();
        let mut seam = [0u8; 2 * Self::KEEP];
        let n = seam
            .iter_mut()
            .zip(self.tail.iter().chain(head))
            .map(|(slot, b)| *slot = *b)
            .count();
        if has(seam.get(..n).unwrap_or_default()) || has(chunk) {
            self.seen = true;
            return;
        }
        // Keep the last KEEP bytes of tail + chunk.
        let from_chunk = chunk.len().min(Self::KEEP);
        let from_tail = Self::KEEP.saturating_sub(from_chunk).min(self.tail.len());
        let tail_start = self.tail.len().saturating_sub(from_tail);
        self.tail.drain(..tail_start);
        self.tail.extend_from_slice(
            chunk
                .get(chunk.len().saturating_sub(from_chunk)..)
                .unwrap_or_default(),
        );
    }

    fn seen(&self) -> bool {
        self.seen
    }
}

/// A circuit permit held for one attempt. Recorded through [`PermitGuard::take`]; dropped
/// unrecorded (a panic, a dropped future), a half-open trial is handed back so the next
/// request can take it, instead of the circuit answering `circuit_open` forever.
pub struct PermitGuard {
    permit: Option<Permit>,
    target: std::sync::Arc<TargetHealth>,
}

impl PermitGuard {
    fn new(permit: Permit, target: &std::sync::Arc<TargetHealth>) -> PermitGuard {
        PermitGuard {
            permit: Some(permit),
            target: target.clone(),
        }
    }

    /// The permit, to record an outcome with (once).
    fn take(&mut self) -> Option<Permit> {
        self.permit.take()
    }
}

impl Drop for PermitGuard {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.target.circuit.abandon(permit);
        }
    }
}

/// The client's response head made from a provider's: the provider's status and the headers
/// in [`RETURNED`], in Lumen's own HTTP version (Pingora writes it), never the provider's.
fn client_head(upstream: &ResponseHeader) -> pingora::Result<Box<ResponseHeader>> {
    let mut head = ResponseHeader::build(upstream.status, Some(RETURNED.len().saturating_add(8)))?;
    for name in RETURNED {
        for value in upstream.headers.get_all(*name) {
            head.append_header(*name, value.clone())?;
        }
    }
    // A JSON answer keeps its length (so the client sees a complete body, or a dropped
    // connection); a stream's is removed by the caller, which may change it.
    // Without a length the body is chunked to the client, whatever the provider's framing
    // (close-delimited would end the client's keep-alive connection).
    match upstream.headers.get(CONTENT_LENGTH) {
        Some(length) => head.insert_header(CONTENT_LENGTH, length.clone())?,
        None => head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?,
    }
    if let Some(id) = upstream
        .headers
        .get("x-request-id")
        .filter(|v| v.len() <= 256)
    {
        head.insert_header(UPSTREAM_REQUEST_ID, id.clone())?;
    }
    Ok(Box::new(head))
}

/// Feeds an attempt's outcome to its target's circuit, updating the gauge and logging when the
/// state changed.
fn record(
    up: &Upstreams<'_>,
    (target, state): (&Target, &TargetState),
    permit: Permit,
    outcome: Outcome,
) {
    let provider = &target.provider;
    let circuit = &state.model.circuit;
    let now_ms = up.health.now_ms();
    if circuit.record(permit, outcome, now_ms, &provider.circuit) {
        let now = circuit.state(now_ms, &provider.circuit);
        let model = target.health_key.as_str();
        up.metrics
            .circuit_state
            .with_label_values(&[provider.name.as_str(), model])
            .set(now.gauge());
        tracing::warn!(provider = %provider.name, model, circuit = now.label(), "circuit breaker changed state");
    }
}

/// `{"error": {...}}`: an error body clients can parse.
fn is_openai_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_object))
}

/// Whether `bytes` so far hold only SSE comments and blank lines (no event yet).
fn only_comments(bytes: &[u8]) -> bool {
    bytes
        .split(|b| *b == b'\n')
        .all(|line| line.is_empty() || line == b"\r" || line.starts_with(b":"))
}

/// Resolves when the client closed or reset its connection, while its request waits for the
/// provider (the body is read by then). Anything else the client sends (a pipelined request,
/// kept for later by Pingora) says nothing: then this never resolves.
async fn client_gone(session: &mut Session) {
    if session.read_body_or_idle(true).await.is_ok() {
        std::future::pending::<()>().await;
    }
}

/// Runs `f` until `deadline` (if any); `Err(())` when the deadline came first.
async fn within<F: std::future::Future>(deadline: Option<Instant>, f: F) -> Result<F::Output, ()> {
    match deadline {
        None => Ok(f.await),
        Some(d) => tokio::time::timeout_at(d.into(), f).await.map_err(|_| ()),
    }
}

/// Reads a whole (small) response body, failing above `limit` bytes.
async fn read_all(upstream: &mut HttpSession, limit: usize) -> Result<Bytes, ()> {
    let mut body = BytesMut::new();
    while let Some(chunk) = upstream.read_response_body().await.map_err(|_| ())? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn failure_of(e: &UpstreamError) -> Failure {
    match e {
        UpstreamError::Connect { .. } => Failure::Connect,
        UpstreamError::Timeout { .. } => Failure::Timeout,
        UpstreamError::Protocol { .. } | UpstreamError::Mismatch { .. } => Failure::Dropped,
        UpstreamError::Status { status, .. } => Failure::Status(*status),
    }
}

fn connect_error(provider: &Provider) -> UpstreamError {
    UpstreamError::Connect {
        provider: provider.name.clone(),
    }
}

fn timeout_error(provider: &Provider) -> UpstreamError {
    UpstreamError::Timeout {
        provider: provider.name.clone(),
    }
}

fn protocol_error(provider: &Provider) -> UpstreamError {
    UpstreamError::Protocol {
        provider: provider.name.clone(),
    }
}

async fn write_request(
    upstream: &mut HttpSession,
    head: RequestHeader,
    body: &[Bytes],
) -> pingora::Result<()> {
    upstream.write_request_header(Box::new(head)).await?;
    for piece in body.iter().filter(|p| !p.is_empty()) {
        upstream.write_request_body(piece.clone(), false).await?;
    }
    upstream.finish_request_body().await
}

/// Most interim answers one exchange may send before its real one (a provider looping on
/// `103 Early Hints` must not hold a request forever).
const MAX_INTERIM: usize = 8;

/// Reads the response head, skipping interim 1xx answers (`100 Continue`, `103 Early Hints`):
/// they are not the answer, and reading a body after one would be a protocol error.
async fn read_final_head(upstream: &mut HttpSession) -> pingora::Result<()> {
    for _ in 0..=MAX_INTERIM {
        upstream.read_response_header().await?;
        let interim = upstream
            .response_header()
            .is_some_and(|h| h.status.is_informational());
        if !interim {
            return Ok(());
        }
    }
    pingora::Error::e_explain(ErrorType::InvalidHTTPHeader, "too many interim answers")
}

/// A reused connection that turned out to be closed while the request was being written:
/// safe to retry, the provider never received a whole request.
fn is_stale_connection(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

fn classify(provider: &Provider, e: &pingora::Error) -> UpstreamError {
    let provider = provider.name.clone();
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            UpstreamError::Timeout { provider }
        }
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError
        | ErrorType::SocketError
        | ErrorType::ConnectProxyFailure => UpstreamError::Connect { provider },
        _ => UpstreamError::Protocol { provider },
    }
}

fn error_kind(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Connect { .. } => "connect",
        UpstreamError::Timeout { .. } => "timeout",
        UpstreamError::Protocol { .. } => "protocol",
        UpstreamError::Status { .. } => "status",
        UpstreamError::Mismatch { .. } => "mismatch",
    }
}

/// `data: {"error":{…}}` followed by a blank line: how a broken stream ends.
pub fn sse_error_event(error: &UpstreamError) -> Bytes {
    let body = GatewayError::from(error.clone()).body();
    let mut event = Vec::with_capacity(body.len().saturating_add(8));
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

/// Builds the provider's request head: its path, host and credentials, the client's other
/// headers, and our request id.
fn upstream_request(
    client: &RequestHeader,
    provider: &Provider,
    req: &LlmRequest,
    body: &[Bytes],
    request_id: &HeaderValue,
) -> Result<RequestHeader, GatewayError> {
    let mut path = String::with_capacity(provider.base_path.len().saturating_add(24));
    path.push_str(&provider.base_path);
    path.push_str(req.endpoint.suffix());
    if let Some(query) = client.uri.query() {
        append_query(&mut path, query);
    }
    let internal =
        |e: pingora::BError| GatewayError::Internal(format!("building upstream request: {e}"));
    let mut head = RequestHeader::build(
        Method::POST,
        path.as_bytes(),
        Some(client.headers.len().saturating_add(6)),
    )
    .map_err(internal)?;
    for (name, value) in client.headers.iter() {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            head.append_header(name.clone(), value.clone())
                .map_err(internal)?;
        }
    }
    let length: usize = body.iter().map(Bytes::len).sum();
    head.insert_header(HOST, provider.host.clone())
        .map_err(internal)?;
    head.insert_header(CONTENT_LENGTH, length)
        .map_err(internal)?;
    if !head.headers.contains_key(CONTENT_TYPE) {
        head.insert_header(CONTENT_TYPE, "application/json")
            .map_err(internal)?;
    }
    head.insert_header("x-request-id", request_id.clone())
        .map_err(internal)?;
    if let Some(auth) = &provider.authorization {
        head.insert_header(http::header::AUTHORIZATION, auth.clone())
            .map_err(internal)?;
    }
    for (name, value) in &provider.headers {
        head.insert_header(name.clone(), value.clone())
            .map_err(internal)?;
    }
    Ok(head)
}

/// Query parameters that carry a client's credential (Azure-style `?api-key=`, `?key=`):
/// like the `Authorization` header, they are for the gateway, never for a provider.
const CREDENTIAL_PARAMS: &[&str] = &[
    "api-key",
    "api_key",
    "apikey",
    "key",
    "access_token",
    "token",
];

/// Appends `query` to `path` without credential parameters.
fn append_query(path: &mut String, query: &str) {
    let mut first = true;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or("");
        if CREDENTIAL_PARAMS
            .iter()
            .any(|c| name.eq_ignore_ascii_case(c))
        {
            continue;
        }
        path.push(if first { '?' } else { '&' });
        path.push_str(pair);
        first = false;
    }
}

/// Appends the per-request headers (request id, CORS) to a response head.
pub fn add_headers(head: &mut ResponseHeader, headers: &[(HeaderName, HeaderValue)]) {
    for (name, value) in headers {
        let _ = head.append_header(name.clone(), value.clone());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::{append_query, DoneWatch};

    #[test]
    fn done_is_found_wherever_the_chunks_split() {
        let stream = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        for size in 1..stream.len() {
            let mut watch = DoneWatch::default();
            for piece in stream.chunks(size) {
                watch.observe(piece);
            }
            assert!(watch.seen(), "{size}");
        }
        let mut watch = DoneWatch::default();
        watch.observe(b"data: {\"text\":\"[DONE\"}\n\n");
        assert!(!watch.seen());
    }

    #[test]
    fn credential_query_parameters_are_never_forwarded() {
        let mut path = String::from("/v1/chat/completions");
        append_query(
            &mut path,
            "api-version=2024-06-01&api-key=sk-secret&KEY=x&user=7",
        );
        assert_eq!(path, "/v1/chat/completions?api-version=2024-06-01&user=7");
        let mut path = String::from("/p");
        append_query(&mut path, "api_key=s");
        assert_eq!(path, "/p");
    }
}
