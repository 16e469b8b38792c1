//! The cache step of the pipeline (DESIGN.md step 9), on Pingora's side: answering hits (as
//! JSON or as an SSE replay), following an identical request in flight, and storing a miss's
//! answer once it is complete.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | hits, followers, lookup and store, coalescing |
//! | [`plan`] | whether and how a request uses the cache |
//! | [`fill`] | recording a miss's answer as it streams |
//! | [`embeddings`] | lists of embeddings, cached item by item |
//! | [`store`] | the node's store and flights |
//!
//! The policy itself (keys, tiers, stream shapes, coalescing) is `lumen_plugins::cache`, plain
//! Rust with no Pingora types. Imports: `proxy`'s gateway and ctx, and `forward`'s watchers.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod embeddings;
pub mod fill;
pub mod plan;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use crate::session::Session;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, StatusCode};
use lumen_plugins::cache::flight::{End, Flight, Join};
use lumen_plugins::cache::store::{now_ms, Entry};
use lumen_plugins::cache::ClientControl;
use lumen_plugins::sse::render_sse;
use lumen_plugins::sse::usage::UsageStrip;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde_json::Value;

use super::ctx::{add_headers, RequestCtx};
use super::forward::{TranslatedStream, Watchers};
use super::gateway::Gateway;
use crate::openai::LlmRequest;
use crate::routing::Route;
use crate::translate::answer::Answer;
use fill::Fill;
use plan::Plan;

/// Sets `x-lumen-cache` (replacing an earlier verdict, such as a follower that had to go
/// upstream after all).
pub fn push_status(ctx: &mut RequestCtx, status: &'static str) {
    ctx.cache = Some(status);
    ctx.response_headers.retain(|(k, _)| {
        k.as_str() != "x-lumen-cache"
            && k.as_str() != "x-lumen-coalesced"
            && *k != lumen_plugins::budget::X_LUMEN_COST
    });
    ctx.response_headers.push((
        HeaderName::from_static("x-lumen-cache"),
        HeaderValue::from_static(status),
    ));
    if status == "hit" {
        // No provider was called: the answer costs nothing, and says so.
        ctx.response_headers.push((
            lumen_plugins::budget::X_LUMEN_COST,
            HeaderValue::from_static("0.000000"),
        ));
    }
}

/// A stored answer ready to write.
pub struct Rendered {
    head: Box<ResponseHeader>,
    body: Bytes,
    /// A translated Responses answer's `response` (for storing it).
    pub completed: Option<Value>,
}

/// A stored answer as this client gets it: JSON, or an SSE stream for a stream request; in
/// the client's API when its request was translated (`answer`).
pub fn render(
    ctx: &mut RequestCtx,
    plan: &Plan,
    entry: &Entry,
    answer: Option<&Answer>,
) -> pingora::Result<Rendered> {
    let (body, sse) = match plan.api.kind().filter(|_| plan.stream) {
        Some(kind) => match render_sse(kind, &entry.body, plan.include_usage) {
            Some(sse) => (Bytes::from(sse), true),
            None => (entry.body.clone(), false),
        },
        None => (entry.body.clone(), false),
    };
    let mut completed = None;
    let body = match answer {
        None => body,
        Some(answer) if sse => {
            let mut stream = TranslatedStream::new(answer.clone());
            stream.commit(200, true);
            let events = stream.filter(&body);
            completed = stream.take_completed();
            events
        }
        Some(answer) => {
            let chat: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let translated = answer.from_chat_json(&chat);
            if matches!(answer, Answer::Responses(_)) {
                completed = serde_json::from_slice(&translated).ok();
            }
            Bytes::from(translated)
        }
    };
    ctx.usage_total = usage_total(&entry.body);
    ctx.provider = Some(entry.provider.clone());
    ctx.stream = sse;
    let mut head = ResponseHeader::build(
        StatusCode::OK,
        Some(ctx.response_headers.len().saturating_add(6)),
    )?;
    head.insert_header(
        CONTENT_TYPE,
        if sse {
            "text/event-stream"
        } else {
            "application/json"
        },
    )?;
    head.insert_header(CONTENT_LENGTH, body.len())?;
    head.insert_header("age", entry.age_secs(now_ms()))?;
    head.insert_header("x-lumen-provider", entry.provider.as_str())?;
    add_headers(&mut head, &ctx.response_headers);
    ctx.status = 200;
    Ok(Rendered {
        head: Box::new(head),
        body,
        completed,
    })
}

/// Writes a rendered answer.
pub async fn write(s: &mut Session, rendered: Rendered) -> pingora::Result<()> {
    s.write_response_header(rendered.head, false).await?;
    s.write_response_body(Some(rendered.body), true).await?;
    Ok(())
}

/// `usage.total_tokens` of a stored answer.
pub fn usage_total(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(body)
        .ok()?
        .get("usage")?
        .get("total_tokens")?
        .as_u64()
}

/// What following an identical request in flight came to.
pub enum Followed {
    /// The answer was written to the client (or the client went away meanwhile).
    Done(pingora::Result<()>),
    /// The leader failed before anything reached this client: join again (and maybe lead).
    TakeOver,
    /// The leader took too long, or its answer cannot be reshaped for this client: go
    /// upstream without coalescing.
    Alone,
}

/// Ends a follower's response whose leader failed mid-way: an SSE error event (a translated
/// stream's own failure event), or a dropped connection for JSON (a truncated body must not
/// look complete).
async fn end_broken(
    s: &mut Session,
    sse: bool,
    translate: Option<&mut TranslatedStream>,
) -> pingora::Result<()> {
    const MESSAGE: &str = "the upstream answer this request shared failed mid-stream";
    if let Some(t) = translate.filter(|_| sse) {
        let failed = t.fail(MESSAGE);
        return s.write_response_body(Some(failed), true).await;
    }
    if sse {
        let event = b"data: {\"error\":{\"message\":\"the upstream answer this request shared failed mid-stream\",\"type\":\"api_error\",\"param\":null,\"code\":\"upstream_unavailable\"}}\n\n";
        s.write_response_body(Some(Bytes::from_static(event)), true)
            .await
    } else {
        pingora::Error::e_explain(
            pingora::ErrorType::ReadError,
            "shared upstream answer failed mid-way",
        )
    }
}

impl Gateway {
    /// Serves this request from the leader's flight; a translated request (`answer`) gets
    /// the leader's chat answer in its own API, with its own ids, like a hit.
    async fn follow(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
        flight: &Flight,
        answer: Option<&Answer>,
    ) -> Followed {
        let wait = self.node.cache.coalesce_wait;
        let Some(head) = flight.head(wait).await else {
            return match flight.end(Duration::ZERO).await {
                Some(_) => Followed::TakeOver,
                None => Followed::Alone,
            };
        };
        // A whole answer is translated whole: it waits for the end, like another shape does.
        let same_shape = head.sse == plan.stream && (head.sse || answer.is_none());
        if !same_shape {
            // JSON for a stream or the other way round: wait for the assembled answer.
            return match flight.end(wait).await {
                Some(End::Complete(Some(body))) => {
                    let entry = Entry {
                        body,
                        created_ms: now_ms(),
                        ttl_ms: 0,
                        provider: head.provider,
                    };
                    let rendered = match render(ctx, plan, &entry, answer) {
                        Ok(rendered) => rendered,
                        Err(e) => return Followed::Done(Err(e)),
                    };
                    self.keep_completed(ctx, rendered.completed.clone()).await;
                    Followed::Done(write(s, rendered).await)
                }
                Some(End::Failed) => Followed::TakeOver,
                Some(End::Complete(None)) | None => Followed::Alone,
            };
        }
        // Same shape: the leader's bytes, as they arrive.
        let mut resp = match ResponseHeader::build(
            StatusCode::OK,
            Some(ctx.response_headers.len().saturating_add(4)),
        ) {
            Ok(r) => r,
            Err(e) => return Followed::Done(Err(e)),
        };
        let content_type = if head.sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        let _ = resp.insert_header(CONTENT_TYPE, content_type);
        // The length is not known until the leader's answer ends.
        let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        let _ = resp.insert_header("x-lumen-provider", head.provider.as_str());
        // A shared answer still being written: as fresh as an answer gets.
        let _ = resp.insert_header("age", 0);
        add_headers(&mut resp, &ctx.response_headers);
        ctx.provider = Some(head.provider.clone());
        ctx.stream = head.sse;
        let mut written = false;
        let mut seen = 0;
        // The leader's stream carries the usage chunk Lumen always asks for; a follower that
        // did not ask for it must not see it (every client gets exactly the stream it asked
        // for). A translated stream reads its usage from that chunk, event by event.
        let mut translate = answer.map(|answer| {
            let mut t = TranslatedStream::new(answer.clone());
            t.commit(200, true);
            t
        });
        let mut strip =
            (head.sse && !plan.include_usage && translate.is_none()).then(UsageStrip::default);
        loop {
            let update = flight.next(seen, wait).await;
            if update.chunks.is_empty() && update.end.is_none() {
                // The leader stalled longer than we wait for it.
                if written {
                    return Followed::Done(end_broken(s, head.sse, translate.as_mut()).await);
                }
                return Followed::Alone;
            }
            if !written && !update.chunks.is_empty() {
                ctx.status = 200;
                if let Err(e) = s.write_response_header(Box::new(resp.clone()), false).await {
                    return Followed::Done(Err(e));
                }
                written = true;
            }
            for chunk in update.chunks {
                seen = seen.saturating_add(1);
                let chunk = match (strip.as_mut(), translate.as_mut()) {
                    (Some(strip), _) => strip.filter(chunk),
                    (None, Some(t)) => t.filter(&chunk),
                    (None, None) => chunk,
                };
                // A Responses stream that completed with this chunk is stored before the client
                // has its end: its next turn may come at once.
                if let Some(t) = translate.as_mut().filter(|t| t.finished()) {
                    self.keep_completed(ctx, t.take_completed()).await;
                }
                if chunk.is_empty() {
                    continue;
                }
                if let Err(e) = s.write_response_body(Some(chunk), false).await {
                    return Followed::Done(Err(e));
                }
            }
            match update.end {
                None => continue,
                Some(End::Complete(body)) => {
                    if !written {
                        // An empty body: nothing was written yet.
                        ctx.status = 200;
                        if let Err(e) = s.write_response_header(Box::new(resp), false).await {
                            return Followed::Done(Err(e));
                        }
                    }
                    ctx.usage_total = body.as_deref().and_then(usage_total);
                    let rest = match (strip.as_mut(), translate.as_mut()) {
                        (Some(strip), _) => strip.finish(),
                        (None, Some(t)) => {
                            let rest = t.end();
                            // Stored before the client has the end: its next turn may come
                            // at once.
                            self.keep_completed(ctx, t.take_completed()).await;
                            rest
                        }
                        (None, None) => Bytes::new(),
                    };
                    if !rest.is_empty() {
                        if let Err(e) = s.write_response_body(Some(rest), false).await {
                            return Followed::Done(Err(e));
                        }
                    }
                    return Followed::Done(s.write_response_body(None, true).await);
                }
                Some(End::Failed) if !written => return Followed::TakeOver,
                Some(End::Failed) => {
                    return Followed::Done(end_broken(s, head.sse, translate.as_mut()).await)
                }
            }
        }
    }

    /// A translated Responses answer's `response`, stored when the client asked for that.
    async fn keep_completed(&self, ctx: &mut RequestCtx, completed: Option<Value>) {
        if let (Some(response), Some(keep)) = (completed, ctx.keep.as_mut()) {
            keep.response = Some(response);
            Box::pin(self.keep_response(ctx)).await;
        }
    }

    /// Step 9 for a request the cache did not answer: a list of embeddings is looked up item
    /// by item (and answered here); an identical request in flight is followed, else this one
    /// leads and its answer is recorded by a fill. `None`: answered here; else the watchers
    /// to forward with.
    pub(super) async fn miss(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        req: &LlmRequest,
        route: &Route,
        plan: Option<&Plan>,
        answer: Option<&Answer>,
    ) -> Result<Option<Watchers>> {
        let Some(plan) = plan else {
            return Ok(Some(Watchers::default()));
        };
        if plan.items.is_some() {
            Box::pin(self.embeddings_by_item(s, ctx, req, route, plan)).await?;
            return Ok(None);
        }
        if plan.control == ClientControl::Bypass {
            return Ok(Some(Watchers::default()));
        }
        let sink = self.node.cache.clone();
        Ok(self
            .coalesce(s, ctx, plan, answer)
            .await?
            .map(|fill| Watchers::filling(fill, sink)))
    }

    /// Step 12 for a forwarded miss: its answer is stored when it was complete.
    pub(super) fn cache_fill(&self, mut watch: Watchers) {
        if let Some(fill) = watch.fill.take() {
            self.cache_store(fill.finish().into_iter().collect());
        }
    }

    /// Step 9: a cached answer for this plan, if there is one. A client's `no-cache` or
    /// `no-store` bypasses the lookup (`bypass` is reported at once); a list of embeddings is
    /// looked up item by item later.
    pub(super) async fn cache_hit(
        &self,
        ctx: &mut RequestCtx,
        plan: Option<&Plan>,
    ) -> Option<Arc<Entry>> {
        match plan {
            Some(p) if p.control == ClientControl::Bypass => {
                push_status(ctx, "bypass");
                None
            }
            Some(p) if p.control == ClientControl::Normal && p.items.is_none() => {
                self.cache_lookup(&p.key).await
            }
            _ => None,
        }
    }

    /// Looks a key up in the cache; a Redis failure is counted and is a miss.
    pub(super) async fn cache_lookup(&self, key: &str) -> Option<Arc<Entry>> {
        match Box::pin(self.node.cache.store.get(key)).await {
            Ok(found) => found.map(|(entry, _)| entry),
            // Counted by the Redis link (`lumen_redis_errors_total{op="cache"}`): a miss.
            Err(_) => None,
        }
    }

    /// Stores answers (see [`Cache::keep`]).
    pub(super) fn cache_store(&self, entries: Vec<(String, Entry)>) {
        self.node.cache.keep(entries);
    }

    /// A cacheable request that missed: joins an identical request in flight (answered from
    /// it: `None`) or leads one, recording its answer for the store with the fill returned.
    /// A translated request (`answer`) shares flights with identical requests in its API: the
    /// flight carries the chat answer, and each follower translates it for itself.
    async fn coalesce(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        plan: &Plan,
        answer: Option<&Answer>,
    ) -> Result<Option<Fill>> {
        if plan.control == ClientControl::Refresh {
            // The client wants a fresh answer: no following; store it for the others.
            push_status(ctx, "miss");
            return Ok(Some(Fill::new(plan, None)));
        }
        loop {
            match self
                .node
                .cache
                .flights
                .join(&plan.key, plan.policy.max_entry_bytes)
            {
                Join::Leader(leader) => {
                    push_status(ctx, "miss");
                    return Ok(Some(Fill::new(plan, Some(leader))));
                }
                Join::Follower(flight) => {
                    push_status(ctx, "hit");
                    // After the status: set together, cleared together.
                    ctx.response_headers.push((
                        HeaderName::from_static("x-lumen-coalesced"),
                        HeaderValue::from_static("1"),
                    ));
                    match Box::pin(self.follow(s, ctx, plan, &flight, answer)).await {
                        Followed::Done(result) => {
                            ctx.cache = Some("coalesced");
                            // Like a hit: no provider call, so no tokens unless the route
                            // charges hits.
                            if !plan.policy.charge_tokens {
                                if let Some(hold) = ctx.tokens.take() {
                                    self.settle_tokens(hold, 0).await;
                                }
                            }
                            return result.map(|()| None);
                        }
                        // The leader failed: the next to join leads (maybe us).
                        Followed::TakeOver => {}
                        Followed::Alone => {
                            push_status(ctx, "miss");
                            return Ok(Some(Fill::new(plan, None)));
                        }
                    }
                }
            }
        }
    }
}
