//! From the commit point on: the response head and the provider's answer, chunk by chunk, to
//! the client (or into the pipeline's capture), every chunk shown to the [`Watchers`]. A
//! stream that breaks or is cut before `data: [DONE]` ends with an error event; a node
//! shutting down ends open streams with a `server_shutting_down` event.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::Instant;

use crate::session::Session;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::upstreams::peer::HttpPeer;

use super::answer::Answer;
use super::error::{
    classify, error_kind, protocol_error, sse_error_event, sse_event_of, ForwardError,
};
use super::pool::Connections;
use super::ready::ready_now;
use super::watch::Watchers;
use crate::drain::Drain;
use crate::error::{GatewayError, UpstreamError};
use crate::metrics::Metrics;
use crate::proxy::ctx::{edit_headers, RequestCtx};
use crate::upstream::provider::Provider;

// Parsed at compile time: a name parsed per request costs more than the rest of the head.
const X_LUMEN_PROVIDER: HeaderName = HeaderName::from_static("x-lumen-provider");
const X_LUMEN_ATTEMPTS: HeaderName = HeaderName::from_static("x-lumen-attempts");
const X_LUMEN_OVERHEAD_US: HeaderName = HeaderName::from_static("x-lumen-overhead-us");
/// Names the request fields the committed target could not be given (`reasoning`…).
const X_LUMEN_DROPPED: HeaderName = HeaderName::from_static("x-lumen-dropped-params");

/// The pipeline's side of the moment a committed answer is complete (the provider's answer
/// arrived whole, or a stream's `data: [DONE]` went by), before the client is sent the last of
/// it: a client that has its answer and asks again at once, on any connection and any thread,
/// must find its limits as this request left them, not still held.
#[async_trait::async_trait]
pub trait Settle: Sync {
    /// Gives back what the request holds (its concurrency slots; its token reservation,
    /// settled with the usage now in `ctx`). The pipeline calls it again when the request
    /// ends, so a second call must find nothing left to give back.
    async fn settle(&self, ctx: &mut RequestCtx);
}

/// Where a committed answer comes from, and what streaming it reports to.
pub(super) struct Source<'a> {
    /// Where the provider's connection goes back when its answer ended cleanly.
    pub connections: &'a Connections,
    pub peer: &'a HttpPeer,
    pub provider: &'a Provider,
    pub metrics: &'a Metrics,
    /// Shutdown: streams still open when the grace period ends are ended cleanly.
    pub drain: &'a Drain,
    /// Gives back what the request holds once its answer is complete.
    pub settle: &'a dyn Settle,
}

/// The commit point: writes the response head and the first chunk, then streams the rest as
/// it arrives. Whatever way it ends, the usage the provider reported (or, for a stream cut
/// short, an estimate of what was generated) is left in `ctx` for settling.
pub(super) async fn stream_to_client(
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: Answer,
    (mut head, first): (Box<ResponseHeader>, Option<Bytes>),
    source: &Source<'_>,
    watch: &mut Watchers,
) -> Result<(), ForwardError> {
    let sse = head
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let provider = source.provider;
    let overhead = u64::try_from(ctx.overhead().as_micros()).unwrap_or(u64::MAX);
    edit_headers(&mut head, |map| {
        for (name, value) in &ctx.response_headers {
            map.append(name.clone(), value.clone());
        }
        if let Some(name) = &provider.name_value {
            map.insert(X_LUMEN_PROVIDER, name.clone());
        }
        map.insert(X_LUMEN_ATTEMPTS, HeaderValue::from(ctx.attempts));
        map.insert(X_LUMEN_OVERHEAD_US, HeaderValue::from(overhead));
        if !ctx.dropped.is_empty() {
            // Field names from fixed lists: always a valid header value.
            if let Ok(v) = HeaderValue::from_str(&ctx.dropped.join(", ")) {
                map.insert(X_LUMEN_DROPPED, v);
            }
        }
    });
    ctx.committed_at = Some(Instant::now());
    ctx.status = head.status.as_u16();
    ctx.stream = sse;
    watch.commit(ctx.status, sse, &provider.name);
    // Answers are messages; vectors and rankings are not recorded.
    let says = !matches!(
        ctx.endpoint,
        Some(crate::openai::Endpoint::Embeddings | crate::openai::Endpoint::Rerank)
    );
    if says && ctx.status < 300 && ctx.trace.as_ref().is_some_and(|t| t.captures_content()) {
        watch.record_answer();
    }
    // A whole answer from a priced target was read to its end (see `attempt`): its usage is
    // read now, once, and its head says what it cost.
    if let (Some(price), Some(body), Some(tap)) = (ctx.price, first.as_deref(), watch.tap()) {
        if !sse && upstream.done() {
            tap.whole(body);
            // Hedges that lost are part of what the request cost.
            let hedges = ctx.hedge_spent.1;
            if let Some(cost) = tap.report().map(|u| price.cost(&u).saturating_add(hedges)) {
                let _ = head.insert_header(
                    lumen_plugins::budget::X_LUMEN_COST,
                    lumen_plugins::budget::format_usd(cost),
                );
            }
        }
    }
    if sse || watch.strips() {
        // Stripping the usage chunk, or a translation, changes the length: a stream (or a
        // rewritten answer) is always chunked.
        head.remove_header(&CONTENT_LENGTH);
        let _ = head.insert_header(http::header::TRANSFER_ENCODING, "chunked");
    }
    if watch.streams_whole() {
        let _ = head.insert_header(CONTENT_TYPE, "text/event-stream");
    }
    let result = pump(session, ctx, upstream, head, first, sse, source, watch).await;
    take_usage(ctx, watch);
    result
}

/// The usage the provider reported, or, for an answer cut short, an estimate of what was
/// generated, into `ctx` for settling, metrics and the ledger.
fn take_usage(ctx: &mut RequestCtx, watch: &mut Watchers) {
    if let (Some(trace), Some((sse, answer))) = (ctx.trace.as_mut(), watch.take_answer()) {
        trace.output(sse, &answer);
    }
    if let Some(tap) = watch.tap() {
        ctx.usage_total = tap.total_tokens();
        ctx.usage_split = tap.split();
        if let Some(report) = tap.report() {
            ctx.usage_detail = (report.cached, report.reasoning);
        }
        if ctx.usage_total.is_none() {
            ctx.usage_estimate = Some(ctx.prompt_estimate.saturating_add(tap.estimate()));
        }
    }
}

/// The answer is complete: the provider's in-flight count is given back, a complete answer
/// stored (its flight ended), and what the request holds given back with the usage it reported
/// (see [`Settle`]), all before the client is sent the last of it: a client that asks again at
/// once must find the provider free, the answer cached and its limits settled.
/// Also says whether a response is to be stored (the client's end then waits for it).
fn complete<'a>(
    ctx: &'a mut RequestCtx,
    watch: &mut Watchers,
    sse: bool,
    source: &'a Source<'_>,
) -> (impl std::future::Future<Output = ()> + 'a, bool) {
    watch.answered();
    if !sse || watch.done_seen() {
        watch.complete();
    }
    take_usage(ctx, watch);
    if let Some(keep) = ctx.keep.as_mut() {
        if keep.response.is_none() {
            keep.response = watch.completed_response();
        }
    }
    let keeping = ctx.keep.as_ref().is_some_and(|k| k.response.is_some());
    (source.settle.settle(ctx), keeping)
}

/// Most bytes gathered from chunks that are already here before they are written.
const BATCH_BYTES: usize = 64 * 1024;

/// Copies the provider's answer to the client (or into the capture), chunk by chunk. A stream
/// must end with `data: [DONE]`: one that ends without it was cut, and ends with an error event
/// like any other broken stream (never cached, counted as failed).
#[allow(clippy::too_many_arguments)]
async fn pump(
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut upstream: Answer,
    head: Box<ResponseHeader>,
    first: Option<Bytes>,
    sse: bool,
    source: &Source<'_>,
    watch: &mut Watchers,
) -> Result<(), ForwardError> {
    // Captured (the pipeline rewrites the answer, e.g. merging cached embeddings): nothing
    // goes to the client from here.
    let capture = watch.capture.is_some();
    if let Some(captured) = watch.capture.as_mut() {
        captured.head = Some(head);
    } else {
        if session.write_response_header(head, false).await.is_err() {
            return Err(ForwardError::ClientGone);
        }
        // A translated stream opens before its first chunk is translated: the client's first
        // bytes do not wait for the whole batch (one more write per translated stream).
        let opening = watch.opening();
        if !opening.is_empty()
            && session
                .write_response_body(Some(opening), false)
                .await
                .is_err()
        {
            return Err(ForwardError::ClientGone);
        }
    }
    // An event stream to the client: the provider's, or a whole answer sent as a translated
    // one. A break ends it with an error event, never a silent cut.
    let events = sse || watch.streams_whole();
    // One wait on the shutdown signal for the whole stream, not one per chunk.
    let cut = source.drain.cut();
    tokio::pin!(cut);
    let mut next = first;
    let mut ends_event = true;
    // Whether the answer was found complete (`complete` ran).
    let mut completed = false;
    loop {
        let Some(chunk) = next.take() else {
            // The provider's answer ended on a read that waited: only the end is left to send.
            if !completed {
                complete(ctx, watch, sse, source).0.await;
            }
            break;
        };
        let mut chunk = watch.chunk(chunk);
        // One read from the provider often holds many chunks (`answer.rs` hands them out one
        // at a time from its buffer): every chunk already here goes to the client in one write, not
        // one write (and one flush) each. What ended the run (the end, an error) is acted on
        // after the write, as if it had been read then.
        let mut ahead = None;
        if !capture {
            let mut batch: Option<BytesMut> = None;
            while batch.as_ref().map_or(chunk.len(), BytesMut::len) < BATCH_BYTES {
                match ready_now(upstream.read_body()) {
                    None => break,
                    Some(Ok(Some(more))) => {
                        let more = watch.chunk(more);
                        batch
                            .get_or_insert_with(|| BytesMut::from(&chunk[..]))
                            .extend_from_slice(&more);
                    }
                    Some(end_or_error) => {
                        ahead = Some(end_or_error);
                        break;
                    }
                }
            }
            if let Some(batch) = batch {
                chunk = batch.freeze();
            }
        }
        // Complete: the provider's answer is all here, or a stream's `[DONE]` went by (the
        // usage chunk comes before it). What this write carries is the client's last of it.
        let mut keeping = false;
        let settling = if !completed
            && (matches!(ahead, Some(Ok(None))) || upstream.done() || (sse && watch.done_seen()))
        {
            completed = true;
            let settle = complete(ctx, watch, sse, source);
            keeping = settle.1;
            Some(settle.0)
        } else {
            None
        };
        if !chunk.is_empty() {
            ends_event = chunk.ends_with(b"\n\n") || chunk.ends_with(b"\r\n\r\n");
        }
        if chunk.is_empty() && watch.strips() {
            // Held back (part of an event) or stripped: nothing to write.
            if let Some(settling) = settling {
                settling.await;
            }
        } else if let Some(captured) = watch.capture.as_mut() {
            if let Some(settling) = settling {
                settling.await;
            }
            if captured.body.len().saturating_add(chunk.len()) > captured.limit {
                return Err(ForwardError::BeforeResponse(GatewayError::Internal(
                    "provider answer too large to merge".into(),
                )));
            }
            captured.body.extend_from_slice(&chunk);
        } else {
            let write = session.write_response_body(Some(chunk), false);
            let written = match settling {
                // Settling is polled first: given back in this process, it is done before a
                // byte is written; through Redis, its command is on its way while the bytes
                // go out, not a round trip before them.
                // A response being stored is stored first: its next turn may come at once,
                // to any node.
                Some(settling) if keeping => {
                    settling.await;
                    write.await
                }
                Some(settling) => tokio::join!(biased; settling, write).1,
                None => write.await,
            };
            if written.is_err() {
                return Err(ForwardError::ClientGone);
            }
        }
        let read = match ahead {
            Some(read) => read,
            None => tokio::select! {
                read = upstream.read_body() => read,
                () = &mut cut, if events && !capture => {
                    // Shutting down: end the stream while the client can still be told why.
                    watch.broke();
                    let error = GatewayError::ShuttingDown;
                    let event = closing_event(watch, sse_event_of(&error), &error, ends_event);
                    let _ = session.write_response_body(Some(event), true).await;
                    return Err(ForwardError::ShuttingDown);
                }
            },
        };
        match read {
            Ok(chunk) => next = chunk,
            Err(e) => {
                let error = classify(source.provider, &e);
                watch.broke();
                let closing = (events && !capture)
                    .then(|| closing_event(watch, sse_error_event(&error), &error, ends_event));
                let broken = broken(session, source, error, closing).await;
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
    if sse && !watch.done_seen() {
        // Closed (or chunk-terminated) before `[DONE]`: a truncated stream, not an end.
        let error = protocol_error(source.provider);
        watch.broke();
        let pending = watch.rest();
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
        let closing =
            (!capture).then(|| closing_event(watch, sse_error_event(&error), &error, ends_event));
        return Err(broken(session, source, error, closing).await);
    }
    let rest = watch.rest();
    if !rest.is_empty()
        && !capture
        && session
            .write_response_body(Some(rest), false)
            .await
            .is_err()
    {
        return Err(ForwardError::ClientGone);
    }
    if !capture && session.write_response_body(None, true).await.is_err() {
        return Err(ForwardError::ClientGone);
    }
    // (Tests: the client has the whole answer; what the attempt still holds is held here.)
    crate::proxy::faults::maybe_pause(session.req_header(), "answer-sent").await;
    source
        .connections
        .release(upstream, source.peer, source.provider.idle_timeout);
    Ok(())
}

/// The event that ends a stream which broke: for a translated stream, its own API's
/// (`response.failed`, always on a fresh line: the translation sends whole events only); else
/// `event` (OpenAI SDKs raise on an `error` object in the stream), on a fresh line if the
/// provider stopped mid-event.
fn closing_event(
    watch: &mut Watchers,
    event: Bytes,
    error: &dyn std::fmt::Display,
    ends_event: bool,
) -> Bytes {
    if let Some(failed) = watch.failed_event(&error.to_string()) {
        return failed;
    }
    if ends_event {
        return event;
    }
    let mut fresh = BytesMut::from(&b"\n\n"[..]);
    fresh.extend_from_slice(&event);
    fresh.freeze()
}

/// The provider failed after the answer was committed: counts it, and for a stream sent to the
/// client ends it with `closing` (see [`closing_event`]).
async fn broken(
    session: &mut Session,
    source: &Source<'_>,
    error: UpstreamError,
    closing: Option<Bytes>,
) -> ForwardError {
    source
        .metrics
        .upstream_errors
        .with_label_values(&[&source.provider.name, error_kind(&error)])
        .inc();
    let sse = closing.is_some();
    if let Some(event) = closing {
        let _ = session.write_response_body(Some(event), true).await;
    }
    ForwardError::AfterResponse { error, sse }
}
