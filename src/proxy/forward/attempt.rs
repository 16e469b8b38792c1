//! One attempt on one target, up to the commit point: the request written through a pooled
//! connection, the answer's head read, and then either a failure the loop may retry (nothing
//! reached the client) or a commit, from which `stream.rs` takes over. The circuit
//! permit of the attempt is held by a [`PermitGuard`], so it is given back however the attempt
//! ends.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::Instant;

use crate::session::Session;
use crate::telemetry::spans as telemetry;
use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::upstreams::peer::HttpPeer;

use super::answer::{Answer, Head};
use super::error::{
    classify, connect_error, failure_of, is_stale_connection, protocol_error, timeout_error,
    ForwardError,
};
use super::pool::Connections;
use super::request::{
    client_head, read_all, target_body, target_model, upstream_request, write_request,
};
use super::stream::{stream_to_client, Settle, Source};
use super::watch::Watchers;
use crate::drain::Drain;
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::openai::LlmRequest;
use crate::proxy::ctx::RequestCtx;
use crate::routing::balance::TargetState;
use crate::routing::Target;
use crate::translate::messages_provider;
use crate::upstream::health::quota::{read_provider_limits, Quotas};
use crate::upstream::health::{HealthTable, Outcome, Permit, TargetHealth};
use crate::upstream::provider::{Api, Provider};
use crate::upstream::retry::{Failure, RetryPolicy};

/// A provider's error answer is kept up to this size so that, if no other target answers, the
/// client gets it as the last error.
const MAX_ERROR_BODY: usize = 256 * 1024;

/// The shared state an attempt loop reads and feeds.
pub struct Upstreams<'a> {
    pub health: &'a HealthTable,
    pub quotas: &'a Quotas,
    pub metrics: &'a Metrics,
    /// Shutdown: streams still open when the grace period ends are ended cleanly.
    pub drain: &'a Drain,
    /// What the request holds is given back through this once its answer is complete.
    pub settle: &'a dyn Settle,
}

/// What one attempt goes to, and within which bounds.
#[derive(Clone, Copy)]
pub(super) struct Try<'a> {
    /// The pool the attempt's connection comes from.
    pub connections: &'a Connections,
    pub target: &'a Target,
    /// The target's health (its provider's and its model's).
    pub state: &'a TargetState,
    pub policy: &'a RetryPolicy,
    /// The route's deadline for the whole request, if it has one.
    pub deadline: Option<Instant>,
}

/// One attempt that ended before anything reached the client.
pub(super) struct Failed {
    pub failure: Failure,
    pub error: UpstreamError,
    /// The provider's own error answer (429/5xx), passed on if it is the last one.
    pub answer: Option<(Box<ResponseHeader>, Bytes)>,
}

/// How one attempt ended.
pub(super) enum Attempt {
    /// A response went to the client: the request is over, whatever `result` says.
    Committed {
        /// How the attempt ended, for `lumen_upstream_attempts_total`.
        label: &'static str,
        result: Result<(), ForwardError>,
    },
    /// Nothing reached the client: another attempt may follow.
    Failed(Failed),
}

/// One attempt on one target. Commits (writes to the client) only once the provider's answer
/// is known good enough to pass on: a success whose first chunk arrived, or a status the route
/// does not retry.
pub(super) async fn attempt(
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &LlmRequest,
    t: &Try<'_>,
    permit: &mut PermitGuard,
    up: &Upstreams<'_>,
    watch: &mut Watchers,
) -> Attempt {
    let whole = ctx.price.is_some() && watch.capture.is_none();
    let outgoing = match prepare(session, ctx, req, t.target, whole) {
        Ok(outgoing) => outgoing,
        Err(e) => {
            if let Some(permit) = permit.take() {
                record(up, t, permit, Outcome::Neutral);
            }
            return internal(e);
        }
    };
    // A client that leaves while the provider thinks is noticed now, not when the answer
    // comes: the provider's connection is dropped, so generation (and billing) stops.
    // Boxed, as is the streaming below: inline, their state (4-5 KiB each) would be part of
    // every future that awaits this one, each moved whole once per request.
    let reached = tokio::select! {
        reached = Box::pin(reach(t, outgoing, up.health)) => reached,
        () = client_gone(session) => return gone(),
    };
    match reached {
        Ok(reached) => commit(session, ctx, req, t, reached, permit, up, watch).await,
        Err(failed) => Attempt::Failed(failed),
    }
}

/// The client left before an answer was committed.
pub(super) fn gone() -> Attempt {
    Attempt::Committed {
        label: "client_gone",
        result: Err(ForwardError::ClientGone),
    }
}

/// The request could not even be built for the target (the client's error, or ours).
pub(super) fn internal(e: crate::error::GatewayError) -> Attempt {
    Attempt::Committed {
        label: "internal",
        result: Err(ForwardError::BeforeResponse(e)),
    }
}

/// A request ready to go to one target.
pub(super) struct Outgoing {
    head: RequestHeader,
    body: Vec<Bytes>,
    /// Fields of the client's request this target's API cannot carry (`x-lumen-dropped`).
    dropped: Vec<&'static str>,
    /// Read a whole (non-SSE) success to its end before committing, so its head can say
    /// what it cost (a priced target, and no capture needing the chunks as they come).
    whole: bool,
    /// Its span, when the request is traced.
    span: Option<Box<telemetry::Attempt>>,
}

/// Builds the request for `target`.
pub(super) fn prepare(
    session: &Session,
    ctx: &RequestCtx,
    req: &LlmRequest,
    target: &Target,
    whole: bool,
) -> Result<Outgoing, crate::error::GatewayError> {
    let provider = &*target.provider;
    let (body, dropped) = target_body(req, target)?;
    // The provider sees this attempt as the parent of its own spans (and never the client's
    // `traceparent`, which names the client's span, not ours).
    let span = ctx.trace.as_deref().map(|trace| {
        trace.attempt(
            req.endpoint,
            &provider.name,
            provider.host.to_str().unwrap_or(""),
            &target_model(req, target),
        )
    });
    let w3c = span.as_deref().map(telemetry::Attempt::headers);
    let head = match upstream_request(
        session.req_header(),
        provider,
        req,
        &body,
        &ctx.request_id,
        w3c,
    ) {
        Ok(head) => head,
        Err(e) => {
            if let Some(span) = span {
                span.failed("internal", &e.to_string());
            }
            return Err(e);
        }
    };
    Ok(Outgoing {
        head,
        body,
        dropped,
        whole,
        span,
    })
}

/// An answer that reached the commit point: its head and first bytes are in.
pub(super) struct Reached {
    upstream: Answer,
    peer: Arc<HttpPeer>,
    head: Box<ResponseHeader>,
    first: Option<Bytes>,
    status: u16,
    sent: Instant,
    dropped: Vec<&'static str>,
    span: Option<Box<telemetry::Attempt>>,
}

/// Sends `outgoing` and reads the answer up to the commit point: a failure the loop may
/// retry (nothing reached the client), or an answer to commit. Touches neither the client
/// nor the request's state, so two of these can race (hedging). A failure ends the attempt's
/// span; an answer carries it on to [`commit`].
pub(super) async fn reach(
    t: &Try<'_>,
    mut outgoing: Outgoing,
    health: &HealthTable,
) -> Result<Reached, Failed> {
    let span = outgoing.span.take();
    match reach_answer(t, outgoing, health).await {
        Ok(reached) => Ok(Reached { span, ..reached }),
        Err(failed) => {
            if let Some(span) = span {
                let why = match failed.failure {
                    Failure::Status(status) => status.to_string(),
                    other => other.label().to_string(),
                };
                span.failed(&why, &failed.error.to_string());
            }
            Err(failed)
        }
    }
}

async fn reach_answer(
    t: &Try<'_>,
    outgoing: Outgoing,
    health: &HealthTable,
) -> Result<Reached, Failed> {
    let (target, state) = (t.target, t.state);
    let provider = &*target.provider;
    let failed = |failure: Failure, error: UpstreamError| Failed {
        failure,
        error,
        answer: None,
    };
    let Outgoing {
        head,
        body,
        dropped,
        whole,
        span: _,
    } = outgoing;
    let sent = Instant::now();
    let Ok(peer) = provider.peer.peer().await else {
        return Err(failed(Failure::Connect, connect_error(provider)));
    };
    let exchange = Box::pin(exchange(t.connections, provider, &peer, head, &body));
    let (mut upstream, upstream_head) = match within(t.deadline, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(failed(failure_of(&e), e)),
        Err(()) => return Err(failed(Failure::Timeout, timeout_error(provider))),
    };
    let status = upstream_head.status.as_u16();
    read_provider_limits(status, &upstream_head.headers, &state.model, health);
    // Our own head in our own HTTP version, with the provider's answer headers only.
    let head = match client_head(&upstream_head) {
        Ok(head) => head,
        Err(_) => return Err(failed(Failure::Dropped, protocol_error(provider))),
    };

    // A status this route retries: keep the answer (it is the last error if nothing else
    // answers) and let the loop try again.
    if status >= 400 && t.policy.retries(Failure::Status(status)) {
        let answer = match within(t.deadline, read_all(&mut upstream, MAX_ERROR_BODY)).await {
            Ok(Ok(body)) => {
                t.connections
                    .release(upstream, &peer, provider.idle_timeout);
                // Kept in OpenAI's shape, whatever the provider's API: it is what the client
                // (or its own API's translation) gets if nothing else answers.
                let body = match provider.api {
                    Api::Openai | Api::Responses => body,
                    Api::Anthropic => Bytes::from(
                        serde_json::to_vec(&messages_provider::error(status, &body))
                            .unwrap_or_default(),
                    ),
                };
                Some((head, body))
            }
            _ => None,
        };
        return Err(Failed {
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
    // comments (`: processing`) some providers send first are held with it. A whole answer
    // from a priced target is read to its end (up to WHOLE_READ_LIMIT), so that its head can
    // say what it cost; one that breaks off meanwhile falls back like any other.
    let sse = head
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let whole = whole && !sse && (200..300).contains(&status);
    let mut first = BytesMut::new();
    loop {
        match within(t.deadline, upstream.read_body()).await {
            Ok(Ok(Some(chunk))) => {
                first.extend_from_slice(&chunk);
                let more = if whole {
                    !upstream.done() && first.len() < WHOLE_READ_LIMIT
                } else {
                    sse && only_comments(&first)
                };
                if !more {
                    break;
                }
            }
            // A success with nothing in it is no answer.
            Ok(Ok(None)) if (200..300).contains(&status) && first.is_empty() => {
                return Err(failed(Failure::Dropped, protocol_error(provider)))
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                let e = classify(provider, &e);
                return Err(failed(failure_of(&e), e));
            }
            Err(()) => return Err(failed(Failure::Timeout, timeout_error(provider))),
        }
    }
    Ok(Reached {
        upstream,
        peer,
        head,
        first: (!first.is_empty()).then(|| first.freeze()),
        status,
        sent,
        dropped,
        span: None,
    })
}

/// From the commit point: the answer goes to the client.
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit(
    session: &mut Session,
    ctx: &mut RequestCtx,
    req: &LlmRequest,
    t: &Try<'_>,
    reached: Reached,
    permit: &mut PermitGuard,
    up: &Upstreams<'_>,
    watch: &mut Watchers,
) -> Attempt {
    let (target, state) = (t.target, t.state);
    let provider = &*target.provider;
    let Reached {
        upstream,
        peer,
        head,
        first,
        status,
        sent,
        dropped,
        span,
    } = reached;
    if let (Some(trace), Some(span)) = (ctx.trace.as_mut(), span) {
        trace.commit(span, status);
    }
    // This attempt's: an earlier attempt's target may have taken more, or less.
    ctx.dropped = dropped;
    // Streams always ask for the usage chunk (budgets, quotas and the ledger settle on
    // it, whatever the client set); the client sees it only if it asked.
    watch.strip_usage(crate::openai::adds_usage(req));
    watch.provider_api(provider.api, req.endpoint);
    let first_byte = sent.elapsed();
    ctx.first_byte = Some(first_byte);
    let series = provider
        .series
        .get(up.metrics, |m| m.provider_series(&provider.name));
    series.first_byte.observe(first_byte.as_secs_f64());
    // Any answer is a latency sample: a target that only fails must not look unmeasured.
    state.model.observe_latency(first_byte);
    let (outcome, label) = match status {
        200..=399 => (Outcome::Success, "ok"),
        429 => (Outcome::Failure, "status_429"),
        500.. => (Outcome::Failure, "status_5xx"),
        _ => (Outcome::Neutral, "status_4xx"),
    };
    if let Some(permit) = permit.take() {
        record(up, t, permit, outcome);
    }
    let source = Source {
        connections: t.connections,
        peer: &peer,
        provider,
        metrics: up.metrics,
        drain: up.drain,
        settle: up.settle,
    };
    let result = Box::pin(stream_to_client(
        session,
        ctx,
        upstream,
        (head, first),
        &source,
        watch,
    ))
    .await;
    series
        .upstream_duration
        .observe(sent.elapsed().as_secs_f64());
    let label = match &result {
        Err(ForwardError::AfterResponse { .. }) => "failed_mid_response",
        _ => label,
    };
    Attempt::Committed { label, result }
}

/// Most of a whole answer read before its head is written; a larger one goes out as it
/// arrives, without `x-lumen-cost-usd`.
const WHOLE_READ_LIMIT: usize = 1 << 20;

/// Writes the request and reads the response head (skipping interim 1xx answers). A
/// pooled connection found closed while the request was being written never delivered
/// it: that one case is retried at once on a fresh connection. Once the request is
/// written, a failure is an attempt like any other (the provider may have run it).
async fn exchange(
    connections: &Connections,
    provider: &Provider,
    peer: &HttpPeer,
    head: RequestHeader,
    body: &[Bytes],
) -> Result<(Answer, Head), UpstreamError> {
    let mut stale_retry_left = true;
    loop {
        let (stream, reused) = connections
            .get(peer)
            .await
            .map_err(|e| classify(provider, &e))?;
        // Every read and write of the exchange is bounded by the provider's `timeout`.
        let written = write_request(stream, &head, body, provider.timeout).await;
        let mut upstream = match written {
            Ok(upstream) => upstream,
            Err(e) if reused && stale_retry_left && is_stale_connection(&e) => {
                stale_retry_left = false;
                continue;
            }
            Err(e) => return Err(classify(provider, &e)),
        };
        let head = upstream
            .read_head()
            .await
            .map_err(|e| classify(provider, &e))?;
        return Ok((upstream, head));
    }
}

/// A circuit permit held for one attempt. Recorded through [`PermitGuard::take`]; dropped
/// unrecorded (a panic, a dropped future), a half-open trial is handed back so the next
/// request can take it, instead of the circuit answering `circuit_open` forever.
pub struct PermitGuard {
    permit: Option<Permit>,
    target: Arc<TargetHealth>,
}

impl PermitGuard {
    pub(super) fn new(permit: Permit, target: &Arc<TargetHealth>) -> PermitGuard {
        PermitGuard {
            permit: Some(permit),
            target: target.clone(),
        }
    }

    /// The permit, to record an outcome with (once).
    pub(super) fn take(&mut self) -> Option<Permit> {
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

/// Feeds an attempt's outcome to its target's circuit, updating the gauge and logging when the
/// state changed.
pub(super) fn record(up: &Upstreams<'_>, t: &Try<'_>, permit: Permit, outcome: Outcome) {
    let provider = &t.target.provider;
    let circuit = &t.state.model.circuit;
    let now_ms = up.health.now_ms();
    if circuit.record(permit, outcome, now_ms, &provider.circuit) {
        let now = circuit.state(now_ms, &provider.circuit);
        let model = t.target.health_key.as_str();
        up.metrics
            .circuit_state
            .with_label_values(&[provider.name.as_str(), model])
            .set(now.gauge());
        tracing::warn!(provider = %provider.name, model, circuit = now.label(), "circuit breaker changed state");
    }
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
pub(super) async fn client_gone(session: &mut Session) {
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
