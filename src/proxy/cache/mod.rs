//! The cache step of the pipeline (DESIGN.md step 6), on Pingora's side: deciding whether a
//! request uses the cache, answering hits (as JSON or as an SSE replay), following an
//! identical request in flight, and recording a miss's answer as it streams to its client.
//!
//! The policy itself (keys, tiers, stream shapes, coalescing) is `lumen_plugins::cache`, plain
//! Rust with no Pingora types.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, StatusCode};
use lumen_plugins::auth::Principal;
use lumen_plugins::cache::flight::{End, Flight, Flights, Head, Leader};
use lumen_plugins::cache::shape::{self, Assembler, Kind};
use lumen_plugins::cache::store::{now_ms, CacheStore, Entry};
use lumen_plugins::cache::{self as policy, Api, CachePolicy, ClientControl, Scope};
use lumen_plugins::redis_link::RedisLink;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::Value;

use crate::config::snapshot::CacheSettings;
use crate::openai::{Endpoint, LlmRequest};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::forward::add_headers;
use crate::routing::Route;
use crate::usage::UsageStrip;

/// Largest entry sent to Redis: bigger answers stay in this node's memory only.
const REDIS_MAX_ENTRY: usize = 4 * 1024 * 1024;

/// The node's cache: its store and the requests in flight.
pub struct Cache {
    pub store: CacheStore,
    pub flights: Arc<Flights>,
    pub coalesce_wait: Duration,
}

impl Cache {
    pub fn new(settings: &CacheSettings, redis: Option<(Arc<RedisLink>, String)>) -> Cache {
        Cache {
            store: CacheStore::new(
                settings.memory_bytes,
                redis.filter(|_| settings.redis),
                REDIS_MAX_ENTRY,
            ),
            flights: Arc::new(Flights::new()),
            coalesce_wait: settings.coalesce_wait,
        }
    }
}

/// How one request uses the cache.
pub struct Plan {
    pub key: String,
    pub policy: CachePolicy,
    pub control: ClientControl,
    pub api: Api,
    pub stream: bool,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// A list embeddings request: cached per item.
    pub items: Option<Items>,
}

/// A list embeddings request, item by item.
pub struct Items {
    pub body: Value,
    pub items: Vec<Value>,
    pub keys: Vec<String>,
}

fn api_of(endpoint: Endpoint) -> Api {
    match endpoint {
        Endpoint::ChatCompletions => Api::Chat,
        Endpoint::Completions => Api::Completion,
        Endpoint::Embeddings => Api::Embeddings,
        Endpoint::Rerank => Api::Rerank,
    }
}

/// Whether and how this request uses the route's cache; `None` when the route has no cache or
/// the request is not cacheable under its policy.
pub fn plan(
    route: &Route,
    req: &LlmRequest,
    principal: &Principal,
    head: &pingora::http::RequestHeader,
) -> Option<Plan> {
    let headers = &head.headers;
    let query = head.uri.query().unwrap_or("");
    let policy = route.cache.clone()?;
    let api = api_of(req.endpoint);
    if !policy::cacheable_raw(api, &req.raw, policy.when)? {
        return None;
    }
    let scope_id = match policy.scope {
        Scope::Key => principal.key_id.as_str(),
        // A key without a tenant is its own tenant.
        Scope::Tenant => principal.tenant.as_deref().unwrap_or(&principal.key_id),
        Scope::Global => "",
    };
    // Keyed from the bytes: a parsed tree of a large body costs many times its size.
    let key = policy::key_raw(
        policy.scope,
        scope_id,
        &route.name,
        &req.model,
        api,
        query,
        &req.raw,
    )?;
    // A list embeddings request is also cached item by item: that needs its items, so it is
    // parsed (a list of strings or token arrays, not a tree of small objects).
    let items = match api {
        Api::Embeddings => {
            let body: Value = serde_json::from_slice(&req.raw).ok()?;
            policy::embed::items(&body).map(|items| {
                let keys = policy::item_keys(
                    policy.scope,
                    scope_id,
                    &route.name,
                    &req.model,
                    query,
                    &body,
                    &items,
                );
                Items { body, items, keys }
            })
        }
        _ => None,
    };
    Some(Plan {
        key,
        control: policy::client_control(headers),
        api,
        stream: req.stream,
        include_usage: req.stream && req.include_usage,
        policy,
        items,
    })
}

/// Sets `x-lumen-cache` (replacing an earlier verdict, such as a follower that had to go
/// upstream after all).
pub fn push_status(ctx: &mut RequestCtx, status: &'static str) {
    ctx.cache = Some(status);
    ctx.response_headers
        .retain(|(k, _)| k.as_str() != "x-lumen-cache" && k.as_str() != "x-lumen-coalesced");
    ctx.response_headers.push((
        HeaderName::from_static("x-lumen-cache"),
        HeaderValue::from_static(status),
    ));
}

/// Writes a stored answer: as JSON, or rendered as an SSE stream for a stream request.
pub async fn serve(
    s: &mut Session,
    ctx: &mut RequestCtx,
    plan: &Plan,
    entry: &Entry,
) -> pingora::Result<()> {
    let (body, sse) = match plan.api.kind().filter(|_| plan.stream) {
        Some(kind) => match shape::render_sse(kind, &entry.body, plan.include_usage) {
            Some(sse) => (Bytes::from(sse), true),
            None => (entry.body.clone(), false),
        },
        None => (entry.body.clone(), false),
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
    s.write_response_header(Box::new(head), false).await?;
    s.write_response_body(Some(body), true).await?;
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

/// Serves this request from the leader's flight.
pub async fn follow(
    s: &mut Session,
    ctx: &mut RequestCtx,
    plan: &Plan,
    flight: &Flight,
    wait: Duration,
) -> Followed {
    let Some(head) = flight.head(wait).await else {
        return match flight.end(Duration::ZERO).await {
            Some(_) => Followed::TakeOver,
            None => Followed::Alone,
        };
    };
    let same_shape = head.sse == plan.stream;
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
                Followed::Done(serve(s, ctx, plan, &entry).await)
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
    // The leader's stream carries the usage chunk Lumen always asks for; a follower that did
    // not ask for it must not see it (every client gets exactly the stream it asked for).
    let mut strip = (head.sse && !plan.include_usage).then(UsageStrip::default);
    loop {
        let update = flight.next(seen, wait).await;
        if update.chunks.is_empty() && update.end.is_none() {
            // The leader stalled longer than we wait for it.
            if written {
                return Followed::Done(end_broken(s, head.sse).await);
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
            let chunk = match strip.as_mut() {
                Some(strip) => strip.filter(chunk),
                None => chunk,
            };
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
                if let Some(rest) = strip.as_mut().map(UsageStrip::finish) {
                    if !rest.is_empty() {
                        if let Err(e) = s.write_response_body(Some(rest), false).await {
                            return Followed::Done(Err(e));
                        }
                    }
                }
                return Followed::Done(s.write_response_body(None, true).await);
            }
            Some(End::Failed) if !written => return Followed::TakeOver,
            Some(End::Failed) => return Followed::Done(end_broken(s, head.sse).await),
        }
    }
}

/// Ends a follower's response whose leader failed mid-way: an SSE error event, or a dropped
/// connection for JSON (a truncated body must not look complete).
async fn end_broken(s: &mut Session, sse: bool) -> pingora::Result<()> {
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

/// Records a cacheable miss's answer as it streams to its client: for the store (when the
/// client allowed it) and for followers.
pub struct Fill {
    key: String,
    ttl: Duration,
    limit: usize,
    store: bool,
    leader: Option<Leader>,
    kind: Option<Kind>,
    status: u16,
    sse: bool,
    provider: String,
    assembler: Option<Assembler>,
    body: BytesMut,
    too_large: bool,
}

impl Fill {
    pub fn new(plan: &Plan, leader: Option<Leader>) -> Fill {
        Fill {
            key: plan.key.clone(),
            ttl: plan.policy.ttl,
            limit: plan.policy.max_entry_bytes,
            store: plan.control != ClientControl::Bypass,
            leader,
            kind: plan.api.kind(),
            status: 0,
            sse: false,
            provider: String::new(),
            assembler: None,
            body: BytesMut::new(),
            too_large: false,
        }
    }

    pub fn head(&mut self, status: u16, sse: bool, provider: &str) {
        self.status = status;
        self.sse = sse;
        self.provider = provider.to_string();
        if sse {
            // Streams are assembled into the non-stream answer (the stored shape).
            // SSE carries the answer two to three times over; the assembled body is checked
            // against the limit itself.
            self.assembler = self
                .kind
                .map(|k| Assembler::new(k, self.limit.saturating_mul(4)));
        }
        if let Some(leader) = self.leader.as_mut() {
            leader.head(Head {
                status,
                sse,
                provider: provider.to_string(),
            });
        }
    }

    pub fn chunk(&mut self, chunk: &Bytes) {
        if let Some(leader) = self.leader.as_mut() {
            leader.chunk(chunk);
        }
        if let Some(assembler) = self.assembler.as_mut() {
            assembler.push(chunk);
        } else if !self.sse && !self.too_large {
            if self.body.len().saturating_add(chunk.len()) > self.limit {
                self.too_large = true;
                self.body = BytesMut::new();
            } else {
                self.body.extend_from_slice(chunk);
            }
        }
    }

    /// The answer went out whole: completes the flight and returns what to store, if the
    /// answer is a complete success within the size limit.
    pub fn finish(self) -> Option<(String, Entry)> {
        let body: Option<Bytes> = if self.status != 200 {
            None
        } else if self.sse {
            self.assembler
                .and_then(Assembler::finish)
                .filter(|b| b.len() <= self.limit)
                .map(Bytes::from)
        } else if self.too_large || !is_json_object(&self.body) {
            None
        } else {
            Some(self.body.freeze())
        };
        if let Some(leader) = self.leader {
            leader.complete(body.clone());
        }
        let body = body.filter(|_| self.store)?;
        Some((self.key, Entry::new(body, self.ttl, &self.provider)))
    }
}

fn is_json_object(body: &[u8]) -> bool {
    body.first() == Some(&b'{') && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}
