//! The request pipeline: Lumen's `ProxyHttp` implementation, phases in DESIGN.md's order.
//!
//! Pingora reads the request head and calls `request_filter`; everything happens from there:
//! ops paths, edge policies, body, routing, forwarding. The response is always written here
//! (`Ok(true)`), so Pingora's own upstream phases never run. Every error is written by one
//! function, `write_error`, in OpenAI's shape.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod cache;
pub mod ctx;
pub mod faults;
pub mod forward;

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, StatusCode};
use lumen_plugins::address::{self, AddressLimiter, Cidr};
use lumen_plugins::auth::{AuthMode, Principal};
use lumen_plugins::rate_limit::shared::{
    OnRedisError, ReservationGuard, SharedError, SharedLimiter, SlotGuard,
};
use lumen_plugins::rate_limit::{
    format_reset, LimitReason, Limited, LocalLimiter, RateStatus, RequestLimit,
};
use lumen_plugins::redis_link::RedisLink;
use lumen_plugins::{Decision, Policy};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use crate::access_log;
use crate::config::Snapshot;
use crate::error::{GatewayError, RequestError};
use crate::jobs::{self, Jobs};
use crate::ledger::{self, Ledger};
use crate::metrics::Metrics;
use crate::openai::{self, Endpoint, LlmRequest, DEFAULT_COMPLETION_TOKENS};
use crate::ops;
use crate::routing::Route;
use crate::upstream::health::quota::Quotas;
use crate::upstream::health::HealthTable;
use cache::{Cache, Fill, Followed, Plan};
use ctx::Captured;
use ctx::{accept_request_id, new_request_id, InFlightGauge, RequestCtx, TokenHold};
use forward::{add_headers, ForwardError, Forwarder, Upstreams};
use lumen_plugins::cache::flight::Join;
use lumen_plugins::cache::store::Entry;
use lumen_plugins::cache::ClientControl;

/// Largest provider answer held to merge with cached embeddings.
const MAX_CAPTURED: usize = 64 * 1024 * 1024;

/// The access log's error for a request whose client went away.
const CLIENT_GONE: &str = "client disconnected";

/// How long an unread request body is drained after an error before the connection closes.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The caller when `auth: off`: may use every model.
static ANONYMOUS: std::sync::LazyLock<Arc<Principal>> =
    std::sync::LazyLock::new(|| Arc::new(Principal::anonymous()));

/// Longest a response write may wait on a client that does not read.
const DOWNSTREAM_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The gateway as a Pingora proxy application. Cheap to share: all state is behind `Arc`s.
pub struct Gateway {
    /// The live config; each request loads it once and keeps that snapshot to the end.
    pub config: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// Rate-limit state: outside the config snapshot, so counters survive reloads.
    limiter: LocalLimiter,
    /// Limits shared through Redis, when configured at start-up.
    shared: Option<(Arc<SharedLimiter>, OnRedisError)>,
    /// Last time (ms since `started`) a Redis failure was logged: once per burst, not per request.
    redis_logged_ms: AtomicU64,
    started: Instant,
    forwarder: Forwarder,
    /// Upstream health (probes, circuits, provider limits): outlives config reloads.
    health: Arc<HealthTable>,
    /// Provider quotas (`quota:` on providers), counted per attempt.
    quotas: Quotas,
    /// The response cache (memory, and Redis when configured) and requests in flight.
    cache: Arc<Cache>,
    /// Usage per key, provider, model and day (file or Redis).
    ledger: Arc<Ledger>,
    /// Async jobs: the queue and table this node's API and workers share.
    jobs: Arc<Jobs>,
    /// Shutdown: open streams end when it says so (`drain::Drainer`).
    drain: Arc<crate::drain::Drain>,
    /// Request counts per client address (`limits.per_ip`), in fixed memory.
    addresses: AddressLimiter,
    /// This process's jobs socket: the only listener on which a job token means anything.
    internal_socket: std::path::PathBuf,
}

/// What admission decided.
enum Admit {
    /// Answered by the gateway itself.
    Reply(ops::Reply),
    /// Answered from the cache.
    Hit(Plan, Arc<Entry>),
    /// To be forwarded on this route (using the cache as planned).
    Forward(LlmRequest, Arc<Route>, Option<Plan>),
    /// A call on the async jobs API, by this caller.
    Job(jobs::api::Call, Arc<lumen_plugins::auth::Principal>),
}

impl Gateway {
    pub fn new(config: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Gateway {
        // Redis settings are read once: a new URL needs a restart (sockets are process state).
        let shared =
            config
                .load()
                .redis
                .as_ref()
                .and_then(|r| match RedisLink::new(&r.url, r.timeout) {
                    Ok(link) => Some((
                        Arc::new(SharedLimiter::new(Arc::new(link), &r.prefix)),
                        r.on_error,
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, "redis limits disabled");
                        None
                    }
                });
        let health = Arc::new(HealthTable::new());
        health.sync(config.load().providers.values());
        // The cache, the usage ledger and the job queue share the limiter's Redis link.
        let snapshot = config.load_full();
        let redis = shared_link(&shared, &snapshot);
        let cache = Arc::new(Cache::new(&snapshot.cache, redis.clone()));
        let ledger = Arc::new(Ledger::new(&snapshot.usage, redis.clone()));
        let jobs = Arc::new(Jobs::new(snapshot.jobs.clone(), redis, metrics.clone()));
        Gateway {
            config,
            metrics,
            limiter: LocalLimiter::new(),
            quotas: Quotas::new(shared.as_ref().map(|(s, _)| s.clone())),
            shared,
            redis_logged_ms: AtomicU64::new(0),
            started: Instant::now(),
            forwarder: Forwarder::new(),
            health,
            cache,
            ledger,
            jobs,
            addresses: AddressLimiter::new(),
            internal_socket: jobs::run::socket_path(),
            drain: Arc::new(crate::drain::Drain::default()),
        }
    }

    /// The shutdown state this gateway's streams watch.
    pub fn drain(&self) -> Arc<crate::drain::Drain> {
        self.drain.clone()
    }

    /// The async jobs of this node (its workers run them).
    pub fn jobs(&self) -> Arc<Jobs> {
        self.jobs.clone()
    }

    /// Answers a jobs API call: JSON, an SSE stream of a job's progress, or (shape B) the
    /// answer once the job ends.
    async fn serve_job(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        call: jobs::api::Call,
        principal: Arc<lumen_plugins::auth::Principal>,
    ) -> Result<bool> {
        let config = ctx
            .config
            .clone()
            .unwrap_or_else(|| self.config.load_full());
        let body = if s.req_header().method == http::Method::POST {
            match read_body(s, &config).await {
                Ok(b) => Some(b),
                Err(e) => {
                    self.write_error(s, ctx, &GatewayError::from(e)).await?;
                    return Ok(true);
                }
            }
        } else {
            None
        };
        match jobs::api::answer(call, body, &principal, &config, &self.jobs).await {
            Ok(jobs::api::Answer::Json(status, value)) => {
                self.write_reply(s, ctx, status, Bytes::from(value.to_string()))
                    .await?;
            }
            Ok(jobs::api::Answer::Wait(id, timeout)) => {
                let (status, value) =
                    jobs::api::wait(&self.jobs, &principal.key_id, &id, timeout).await;
                self.write_reply(s, ctx, status, Bytes::from(value.to_string()))
                    .await?;
            }
            Ok(jobs::api::Answer::Events(id, style)) => {
                ctx.status = 200;
                ctx.stream = true;
                jobs::api::stream(
                    s,
                    &ctx.response_headers,
                    &self.jobs,
                    &principal.key_id,
                    &id,
                    style,
                )
                .await?;
            }
            Err(e) => {
                if matches!(e, GatewayError::JobRefused(_)) {
                    ctx.response_headers
                        .push((http::header::RETRY_AFTER, HeaderValue::from_static("1")));
                }
                self.write_error(s, ctx, &e).await?;
            }
        }
        Ok(true)
    }

    /// The usage ledger; the admin service reads it, the flusher writes it out.
    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// The health table this gateway routes by; the prober and the admin service share it.
    pub fn health(&self) -> Arc<HealthTable> {
        self.health.clone()
    }

    /// The Redis connection used for shared limits, when configured.
    pub fn redis(&self) -> Option<Arc<SharedLimiter>> {
        self.shared.as_ref().map(|(s, _)| s.clone())
    }

    /// DESIGN.md's pipeline steps 1–10, in order; any `Err` is written by `write_error`.
    async fn admit(&self, s: &mut Session, ctx: &mut RequestCtx) -> Result<Admit, GatewayError> {
        let config = ctx
            .config
            .clone()
            .ok_or_else(|| GatewayError::Internal("no config".into()))?;
        let head = s.req_header();
        let path = head.uri.path();
        // 1. Probes: no auth, never limited.
        let redis = self.shared.as_ref().map(|_| self.health.redis_ok());
        if let Some(reply) =
            ops::answer_probe(&head.method, path, &config, &self.health, redis, &self.jobs)
        {
            return reply.map(Admit::Reply);
        }
        // 2. A worker running a job: it acts as the job's key, whose request limit was counted
        // when the job was submitted (its token budget is reserved below, as for anyone).
        // Only on the internal socket: anywhere else the header means nothing (and is never
        // forwarded), so it can neither skip the per-address limit nor authenticate.
        let internal = self.on_internal_socket(s);
        let job = match head.headers.get(jobs::run::JOB_TOKEN).filter(|_| internal) {
            None => None,
            Some(token) => match token.to_str().ok().and_then(|t| self.jobs.by_token(t)) {
                // A configured key is looked up again in this request's config: a key removed
                // or disabled by a reload since its job was queued runs nothing more (its
                // limits and allow-list are the current ones too).
                Some(owner) if owner.configured => {
                    match config
                        .auth
                        .principal_by_id(&owner.key_id, SystemTime::now())
                    {
                        Some(current) => Some(current),
                        None => {
                            return Err(GatewayError::Auth(
                                lumen_plugins::auth::AuthError::UnknownKey,
                            ))
                        }
                    }
                }
                Some(owner) => Some(owner),
                None => {
                    return Err(GatewayError::Auth(
                        lumen_plugins::auth::AuthError::UnknownKey,
                    ))
                }
            },
        };
        let jobs_call = match jobs::api::route(&head.method, path, &config.jobs) {
            Some(Ok(call)) => Some(call),
            Some(Err(e)) => return Err(e),
            None => None,
        };
        // 3. Floods from one address are cut before any key is checked.
        if let (Some(per_ip), false) = (&config.limits.per_ip, internal) {
            let address = client_address(s, &config.server.trusted_proxies, per_ip.ipv6_prefix);
            if let Err(limited) = self.check_address(address, &per_ip.limit).await {
                return Err(self.refuse(ctx, &limited));
            }
        }
        let head = s.req_header();
        let path = head.uri.path();
        // With `auth: off` the listener's address is the only protection: refuse what a web
        // page could send it (a DNS name re-pointed at us, a cross-site form post).
        let open = config.auth.mode() == AuthMode::Off && !internal;
        if open && !host_is_local(head) {
            return Err(GatewayError::HostNotAllowed);
        }
        // 4. Authenticate: 401 before anything else is looked at.
        let principal = if let Some(owner) = &job {
            owner.clone()
        } else {
            // A browser's EventSource cannot send headers: shape A's stream takes `?api_key=`.
            let from_query = match &jobs_call {
                Some(jobs::api::Call::Stream(_)) => query_api_key(&head.headers, head.uri.query()),
                _ => None,
            };
            let headers = from_query.as_ref().unwrap_or(&head.headers);
            match config.auth.authenticate(headers, SystemTime::now())? {
                Some(principal) => principal,
                None => ANONYMOUS.clone(),
            }
        };
        ctx.principal = Some(principal.clone());
        if let Some(reply) = ops::answer(&head.method, path, &config, &principal) {
            return reply.map(Admit::Reply);
        }
        if let Some(call) = jobs_call {
            if open && head.method == http::Method::POST {
                json_body_required(head, config.limits.max_body_bytes)?;
            }
            if call.submits() {
                self.limit(ctx, &principal).await?;
            }
            return Ok(Admit::Job(call, principal));
        }
        // 5. Request-count limits need no body: refuse floods before reading one.
        if job.is_none() {
            self.limit(ctx, &principal).await?;
        }
        let endpoint = Endpoint::from_path(path).ok_or_else(|| GatewayError::UnknownEndpoint {
            method: head.method.to_string(),
            path: path.to_string(),
        })?;
        ctx.endpoint = Some(endpoint);
        if head.method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed {
                method: head.method.to_string(),
                path: path.to_string(),
            });
        }
        if open {
            json_body_required(head, config.limits.max_body_bytes)?;
        }
        // 6. Body: bounded, read once, kept for every attempt.
        let raw = read_body(s, &config).await?;
        let req = openai::parse(endpoint, raw)?;
        ctx.stream = req.stream;
        // 7. Route. The allow-list names what clients ask for, so it is checked on the
        // client's model, and before the route table: a key must not learn which models exist
        // beyond its own (403 for every model it may not use, existing or not).
        if !principal.may_use(&req.model) {
            return Err(GatewayError::ModelNotAllowed(req.model.clone()));
        }
        let route = config
            .routes
            .resolve(&req.model)
            .ok_or_else(|| GatewayError::ModelNotFound(req.model.clone()))?;
        ctx.route = Some(route.name.clone());
        ctx.model = Some(req.model.clone());
        // 8. The route's own request limit, per key.
        if let Some(limit) = &route.limits {
            let bucket = format!("{}{}", principal.key_id, route.bucket_suffix);
            match self.check_requests(&bucket, limit).await {
                Ok(status) => push_headers(ctx, "requests", &status),
                Err(limited) => return Err(self.refuse(ctx, &limited)),
            }
        }
        // 9. Cache: a hit answers here. It counted as a request above, but costs no provider
        // call and, unless the route says so, no tokens.
        let plan = cache::plan(&route, &req, &principal, s.req_header());
        let hit = match &plan {
            Some(p) if p.control == ClientControl::Bypass => {
                cache::push_status(ctx, "bypass");
                None
            }
            Some(p) if p.control == ClientControl::Normal && p.items.is_none() => {
                self.cache_lookup(&p.key).await
            }
            _ => None,
        };
        let plan = match (hit, plan) {
            (Some(entry), Some(plan)) => {
                if plan.policy.charge_tokens {
                    self.reserve_tokens(ctx, &principal, &req).await?;
                }
                cache::push_status(ctx, "hit");
                return Ok(Admit::Hit(plan, entry));
            }
            (_, plan) => plan,
        };
        // Token budgets: reserve an estimate now, settle with real usage after.
        self.reserve_tokens(ctx, &principal, &req).await?;
        Ok(Admit::Forward(req, route, plan))
    }

    /// Whether the request came in on this process's jobs socket (a Unix socket; every public
    /// listener is TCP).
    fn on_internal_socket(&self, s: &Session) -> bool {
        s.server_addr()
            .and_then(|a| a.as_unix())
            .and_then(|u| u.as_pathname())
            .is_some_and(|path| path == self.internal_socket)
    }

    /// The per-address request limit: through Redis when configured (exact, keys expire),
    /// else (and when Redis fails open) in this process's fixed-size [`AddressLimiter`].
    async fn check_address(
        &self,
        address: std::net::IpAddr,
        limit: &RequestLimit,
    ) -> Result<RateStatus, Limited> {
        let local = || self.addresses.check(address, limit, Instant::now());
        let Some((shared, _)) = &self.shared else {
            return local();
        };
        match shared.check_request(&format!("ip:{address}"), limit).await {
            Ok(result) => result,
            Err(e) => match self.redis_failed(&e) {
                OnRedisError::FailOpen => local(),
                OnRedisError::FailClosed => Err(unavailable(limit.count)),
            },
        }
    }

    /// Looks a key up in the cache; a Redis failure is counted and is a miss.
    async fn cache_lookup(&self, key: &str) -> Option<Arc<Entry>> {
        match self.cache.store.get(key).await {
            Ok(found) => found.map(|(entry, _)| entry),
            Err(_) => {
                self.metrics
                    .redis_errors
                    .with_label_values(&["cache"])
                    .inc();
                None
            }
        }
    }

    /// Stores answers: in memory at once (the next request hits), in Redis off the request's
    /// path.
    fn cache_store(&self, entries: Vec<(String, Entry)>) {
        if entries.is_empty() {
            return;
        }
        let entries: Vec<(String, Arc<Entry>)> =
            entries.into_iter().map(|(k, e)| (k, Arc::new(e))).collect();
        self.cache.store.remember(&entries);
        let cache = self.cache.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            if cache.store.share(&entries).await.is_err() {
                metrics.redis_errors.with_label_values(&["cache"]).inc();
            }
        });
    }

    /// A cacheable request that missed: joins an identical request in flight (answered from
    /// it) or leads one, recording its answer for the store. `Ok(true)`: answered.
    async fn coalesce(&self, s: &mut Session, ctx: &mut RequestCtx, plan: &Plan) -> Result<bool> {
        if plan.control == ClientControl::Refresh {
            // The client wants a fresh answer: no following; store it for the others.
            cache::push_status(ctx, "miss");
            ctx.fill = Some(Fill::new(plan, None));
            return Ok(false);
        }
        let wait = self.cache.coalesce_wait;
        loop {
            match self
                .cache
                .flights
                .join(&plan.key, plan.policy.max_entry_bytes)
            {
                Join::Leader(leader) => {
                    cache::push_status(ctx, "miss");
                    ctx.fill = Some(Fill::new(plan, Some(leader)));
                    return Ok(false);
                }
                Join::Follower(flight) => {
                    cache::push_status(ctx, "hit");
                    // After the status: set together, cleared together.
                    ctx.response_headers.push((
                        HeaderName::from_static("x-lumen-coalesced"),
                        HeaderValue::from_static("1"),
                    ));
                    match cache::follow(s, ctx, plan, &flight, wait).await {
                        Followed::Done(result) => {
                            ctx.cache = Some("coalesced");
                            // Like a hit: no provider call, so no tokens unless the route
                            // charges hits.
                            if !plan.policy.charge_tokens {
                                if let Some(hold) = ctx.tokens.take() {
                                    self.settle_tokens(hold, 0).await;
                                }
                            }
                            return result.map(|()| true);
                        }
                        // The leader failed: the next to join leads (maybe us).
                        Followed::TakeOver => {}
                        Followed::Alone => {
                            cache::push_status(ctx, "miss");
                            ctx.fill = Some(Fill::new(plan, None));
                            return Ok(false);
                        }
                    }
                }
            }
        }
    }

    /// A list embeddings request: cached items come from the cache, only the others go
    /// upstream (the request rewritten to carry just them), and the answer is merged back in
    /// the client's order.
    async fn embeddings_by_item(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        req: &LlmRequest,
        route: &Route,
        plan: &Plan,
    ) -> Result<bool> {
        let Some(items) = &plan.items else {
            return Ok(false);
        };
        let (mut found, error) = if plan.control == ClientControl::Normal {
            self.cache.store.get_many(&items.keys).await
        } else {
            (vec![None; items.keys.len()], None)
        };
        if error.is_some() {
            self.metrics
                .redis_errors
                .with_label_values(&["cache"])
                .inc();
        }
        let missing: Vec<usize> = found
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(i, _)| i)
            .collect();
        let hits = found.len().saturating_sub(missing.len());
        ctx.response_headers.push((
            HeaderName::from_static("x-lumen-cache-items"),
            HeaderValue::from_str(&format!("{hits}/{}", found.len()))
                .unwrap_or(HeaderValue::from_static("0")),
        ));
        let provider;
        let mut usage = serde_json::json!({"prompt_tokens": 0, "total_tokens": 0});
        let mut model = req.model.clone();
        if missing.is_empty() {
            cache::push_status(ctx, "hit");
            provider = found
                .first()
                .and_then(|e| e.as_ref().map(|e| e.provider.clone()))
                .unwrap_or_default();
        } else {
            if plan.control != ClientControl::Bypass {
                cache::push_status(ctx, "miss");
            }
            let subset: Vec<serde_json::Value> = missing
                .iter()
                .filter_map(|&i| items.items.get(i).cloned())
                .collect();
            let raw = Bytes::from(lumen_plugins::cache::embed::with_items(
                &items.body,
                &subset,
            ));
            let sub = match openai::parse(Endpoint::Embeddings, raw) {
                Ok(sub) => sub,
                Err(e) => {
                    self.write_error(s, ctx, &e.into()).await?;
                    return Ok(true);
                }
            };
            ctx.capture = Some(Captured {
                limit: MAX_CAPTURED,
                head: None,
                body: BytesMut::new(),
            });
            let upstreams = Upstreams {
                health: &self.health,
                quotas: &self.quotas,
                metrics: &self.metrics,
                drain: &self.drain,
            };
            let result = self
                .forwarder
                .forward(s, ctx, &sub, route, &upstreams)
                .await;
            let captured = ctx.capture.take();
            if let Err(e) = result {
                return self.forward_failed(s, ctx, e).await;
            }
            let Some(Captured {
                head: Some(head),
                body,
                ..
            }) = captured
            else {
                return Ok(true);
            };
            let body = body.freeze();
            let fresh = (head.status == 200)
                .then(|| lumen_plugins::cache::embed::split(&body, missing.len()))
                .flatten();
            let Some(fresh) = fresh else {
                if head.status == 200 {
                    // A success that does not hold one vector per input cannot be merged with
                    // the cached ones: passing it on would pair inputs with wrong vectors.
                    let error = GatewayError::Upstream(crate::error::UpstreamError::Mismatch {
                        provider: ctx.provider.clone().unwrap_or_default(),
                        detail: format!(
                            "the embeddings answer does not hold one vector per input ({} sent)",
                            missing.len()
                        ),
                    });
                    self.write_error(s, ctx, &error).await?;
                    return Ok(true);
                }
                // An error answer: the provider's, as is.
                ctx.status = head.status.as_u16();
                s.write_response_header(head, false).await?;
                s.write_response_body(Some(body), true).await?;
                return Ok(true);
            };
            let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Some(u) = answer.get("usage").filter(|u| u.is_object()) {
                usage = u.clone();
            }
            if let Some(m) = answer.get("model").and_then(serde_json::Value::as_str) {
                model = m.to_string();
            }
            provider = ctx.provider.clone().unwrap_or_default();
            let mut stored = Vec::new();
            for (&i, vector) in missing.iter().zip(fresh) {
                let bytes = Bytes::from(serde_json::to_vec(&vector).unwrap_or_default());
                let entry = Entry::new(bytes, plan.policy.ttl, &provider);
                if let Some(key) = items
                    .keys
                    .get(i)
                    .filter(|_| plan.control != ClientControl::Bypass)
                {
                    stored.push((key.clone(), entry.clone()));
                }
                if let Some(slot) = found.get_mut(i) {
                    *slot = Some(Arc::new(entry));
                }
            }
            self.cache_store(stored);
        }
        let vectors: Vec<serde_json::Value> = found
            .iter()
            .map(|e| {
                e.as_ref()
                    .and_then(|e| serde_json::from_slice(&e.body).ok())
                    .unwrap_or(serde_json::Value::Null)
            })
            .collect();
        let merged = lumen_plugins::cache::embed::merge(&model, vectors, usage);
        ctx.usage_total = cache::usage_total(&merged);
        let mut head = ResponseHeader::build(
            StatusCode::OK,
            Some(ctx.response_headers.len().saturating_add(6)),
        )?;
        head.insert_header(CONTENT_TYPE, "application/json")?;
        head.insert_header(CONTENT_LENGTH, merged.len())?;
        if !provider.is_empty() {
            head.insert_header("x-lumen-provider", provider.as_str())?;
        }
        if ctx.attempts > 0 {
            head.insert_header("x-lumen-attempts", ctx.attempts)?;
        }
        add_headers(&mut head, &ctx.response_headers);
        ctx.status = 200;
        s.write_response_header(Box::new(head), false).await?;
        s.write_response_body(Some(Bytes::from(merged)), true)
            .await?;
        Ok(true)
    }

    /// What the client sees of a forward that failed.
    async fn forward_failed(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        e: ForwardError,
    ) -> Result<bool> {
        match e {
            ForwardError::BeforeResponse(e) => {
                self.write_error(s, ctx, &e).await?;
                Ok(true)
            }
            ForwardError::AfterResponse { error, sse: true } => {
                // The stream already ended with an error event; the connection is sound.
                ctx.error = Some(error.to_string());
                Ok(true)
            }
            ForwardError::AfterResponse { error, sse: false } => {
                ctx.error = Some(error.to_string());
                // Dropping the connection is the only honest way to show a truncated body.
                Error::e_explain(ErrorType::ReadError, "upstream failed mid-response")
            }
            ForwardError::ShuttingDown => {
                // The stream already ended with a `server_shutting_down` event.
                ctx.error = Some("server shutting down".into());
                Ok(true)
            }
            ForwardError::ClientGone => {
                ctx.error = Some(CLIENT_GONE.into());
                Error::e_explain(ErrorType::ConnectionClosed, CLIENT_GONE)
            }
        }
    }

    /// Applies the caller's request-rate and concurrency limits, adding the `x-ratelimit-*`
    /// headers to whatever response follows (a 429 gets `Retry-After` too).
    async fn limit(&self, ctx: &mut RequestCtx, principal: &Principal) -> Result<(), GatewayError> {
        let Some(limits) = &principal.limits else {
            return Ok(());
        };
        if limits.requests.is_none() && limits.concurrency.is_none() {
            return Ok(());
        }
        // With Redis: rate and concurrency in one round trip.
        if let Some((shared, _)) = &self.shared {
            // The slot's member is ours, never the client's `x-request-id`: a client reusing
            // one id must not hold one slot for many requests.
            let member = if limits.concurrency.is_some() {
                crate::proxy::ctx::new_slot_id()
            } else {
                String::new()
            };
            match shared
                .admit(
                    &principal.key_id,
                    limits.requests.as_ref(),
                    limits.concurrency,
                    &member,
                )
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
    async fn check_requests(&self, key: &str, limit: &RequestLimit) -> Result<RateStatus, Limited> {
        let Some((shared, _)) = &self.shared else {
            return self.limiter.check_request(key, limit, Instant::now());
        };
        match shared.check_request(key, limit).await {
            Ok(result) => result,
            Err(e) => match self.redis_failed(&e) {
                OnRedisError::FailOpen => self.limiter.check_request(key, limit, Instant::now()),
                OnRedisError::FailClosed => Err(unavailable(limit.count)),
            },
        }
    }

    /// Counts and (once per burst) logs a Redis failure; returns what to do about it.
    fn redis_failed(&self, e: &SharedError) -> OnRedisError {
        let on_error = self
            .shared
            .as_ref()
            .map_or(OnRedisError::FailOpen, |(_, o)| *o);
        self.metrics
            .redis_errors
            .with_label_values(&["rate_limit"])
            .inc();
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.redis_logged_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) > 10_000
            && self
                .redis_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, on_redis_error = ?on_error, "redis unavailable for rate limits");
        }
        on_error
    }

    /// Reserves the request's estimated tokens under the caller's token budgets (in Redis when
    /// configured), adding the `x-ratelimit-*-tokens` headers.
    async fn reserve_tokens(
        &self,
        ctx: &mut RequestCtx,
        principal: &Principal,
        req: &LlmRequest,
    ) -> Result<(), GatewayError> {
        let Some(limits) = principal.limits.as_ref().filter(|l| !l.tokens.is_empty()) else {
            return Ok(());
        };
        let estimate = req.token_estimate(DEFAULT_COMPLETION_TOKENS);
        let local = || {
            self.limiter
                .reserve_tokens(&principal.key_id, &limits.tokens, estimate, Instant::now())
                .map(|(r, status)| (TokenHold::Local(r), status))
        };
        let result = match &self.shared {
            None => local(),
            Some((shared, _)) => match shared
                .reserve_tokens(&principal.key_id, &limits.tokens, estimate)
                .await
            {
                Ok(result) => result.map(|(r, status)| {
                    (
                        TokenHold::Shared(ReservationGuard::new(shared.clone(), r)),
                        status,
                    )
                }),
                Err(e) => match self.redis_failed(&e) {
                    OnRedisError::FailOpen => local(),
                    OnRedisError::FailClosed => Err(unavailable(0)),
                },
            },
        };
        match result {
            Ok((hold, status)) => {
                push_headers(ctx, "tokens", &status);
                ctx.tokens = Some(hold);
                ctx.track_usage = true;
                Ok(())
            }
            Err(limited) => Err(self.refuse(ctx, &limited)),
        }
    }

    /// Replaces a token reservation's estimate with what the request used.
    async fn settle_tokens(&self, hold: TokenHold, actual: u64) {
        match (hold, &self.shared) {
            (TokenHold::Local(r), _) => r.settle(actual),
            (TokenHold::Shared(mut guard), Some((shared, _))) => {
                if let Some(r) = guard.take() {
                    if let Err(e) = shared.settle_tokens(&r, actual).await {
                        self.redis_failed(&e);
                    }
                }
            }
            (TokenHold::Shared(_), None) => {}
        }
    }

    fn refuse(&self, ctx: &mut RequestCtx, limited: &Limited) -> GatewayError {
        let kind = match limited.reason {
            LimitReason::Tokens => "tokens",
            _ => "requests",
        };
        push_headers(ctx, kind, &limited.status);
        // Whole seconds, rounded up: a client that waits this long is admitted.
        let secs = limited
            .retry_after
            .as_secs()
            .saturating_add(u64::from(limited.retry_after.subsec_nanos() > 0));
        ctx.response_headers
            .push((http::header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        self.metrics
            .rate_limited
            .with_label_values(&[ctx.key_label(), limited.reason.label()])
            .inc();
        GatewayError::RateLimited(limited.reason)
    }

    /// Writes a complete response: status, JSON body, and the request's own headers.
    async fn write_reply(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        status: StatusCode,
        body: Bytes,
    ) -> Result<()> {
        let mut head =
            ResponseHeader::build(status, Some(ctx.response_headers.len().saturating_add(4)))?;
        head.insert_header(CONTENT_TYPE, "application/json")?;
        head.insert_header(CONTENT_LENGTH, body.len())?;
        add_headers(&mut head, &ctx.response_headers);
        ctx.status = status.as_u16();
        let head_only = s.req_header().method == http::Method::HEAD;
        s.write_response_header(Box::new(head), head_only).await?;
        if !head_only {
            s.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// The one place an error becomes a response.
    async fn write_error(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        err: &GatewayError,
    ) -> Result<()> {
        ctx.error = Some(err.to_string());
        let too_large = matches!(
            err,
            GatewayError::Request(RequestError::BodyTooLarge { .. } | RequestError::BodyTimeout)
        );
        if too_large {
            // The rest of the body is still on the wire; never read it as the next request.
            s.set_keepalive(None);
        } else if tokio::time::timeout(LINGER, s.drain_request_body())
            .await
            .is_err()
        {
            // Errors found before the body was read (404, 405) leave it on the wire. Pingora
            // closes a connection whose request body is unread when the response starts, so
            // read and discard it first, briefly, to keep the connection usable.
            s.set_keepalive(None);
        }
        self.write_reply(s, ctx, err.parts().status, Bytes::from(err.body()))
            .await?;
        if too_large {
            // Lingering close: keep reading and discarding briefly, so a client still sending
            // its body sees the 413 instead of a reset connection.
            let _ = tokio::time::timeout(LINGER, s.drain_request_body()).await;
        }
        Ok(())
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
    let (limit, remaining, reset_name) = match kind {
        "tokens" => (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
        _ => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
    };
    // Several limits (key, route) may apply: report the tightest, as one set of headers.
    let current = ctx
        .response_headers
        .iter()
        .find(|(k, _)| k.as_str() == remaining)
        .and_then(|(_, v)| v.to_str().ok()?.parse::<u32>().ok());
    if current.is_some_and(|c| c <= status.remaining) {
        return;
    }
    ctx.response_headers
        .retain(|(k, _)| ![limit, remaining, reset_name].contains(&k.as_str()));
    ctx.response_headers.extend([
        (
            HeaderName::from_static(limit),
            HeaderValue::from(status.limit),
        ),
        (
            HeaderName::from_static(remaining),
            HeaderValue::from(status.remaining),
        ),
        (HeaderName::from_static(reset_name), reset),
    ]);
}

/// Reads the whole request body, refusing more than `limits.max_body_bytes` bytes, and a body
/// still arriving `server.body_timeout` after its head (408). A body that arrives in one
/// piece (the common case) is kept as is, without a copy.
async fn read_body(s: &mut Session, config: &Snapshot) -> Result<Bytes, RequestError> {
    let limit = config.limits.max_body_bytes;
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(config.server.connections.body_timeout)
        .unwrap_or(now);
    let declared = s
        .req_header()
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(RequestError::BodyTooLarge { limit });
    }
    // `Expect: 100-continue` (curl sends it for bodies over 1 KiB): the client waits for our
    // go-ahead before sending the body. Answered here, at the edge; never forwarded.
    let expects = s
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects {
        s.write_continue_response()
            .await
            .map_err(|e| RequestError::ReadBody(e.etype().as_str().to_string()))?;
    }
    let mut buf: Option<BytesMut> = None;
    let mut first: Option<Bytes> = None;
    loop {
        let read = tokio::time::timeout_at(deadline, s.read_request_body());
        let chunk = match read.await.map_err(|_| RequestError::BodyTimeout)? {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(RequestError::ReadBody(e.etype().as_str().to_string())),
        };
        let so_far = first
            .as_ref()
            .map_or(0, Bytes::len)
            .saturating_add(buf.as_ref().map_or(0, BytesMut::len));
        if so_far.saturating_add(chunk.len()) > limit {
            return Err(RequestError::BodyTooLarge { limit });
        }
        match (&mut first, &mut buf) {
            (None, None) => first = Some(chunk),
            (Some(f), None) => {
                let mut b = BytesMut::with_capacity(
                    declared
                        .unwrap_or(f.len().saturating_add(chunk.len()))
                        .min(limit),
                );
                b.extend_from_slice(f);
                b.extend_from_slice(&chunk);
                first = None;
                buf = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&chunk),
        }
    }
    Ok(match (first, buf) {
        (Some(f), _) => f,
        (None, Some(b)) => b.freeze(),
        (None, None) => Bytes::new(),
    })
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn early_request_filter(&self, s: &mut Session, _ctx: &mut RequestCtx) -> Result<()> {
        // The head is in: the rest of this request is off the header clock.
        crate::conn::request_started(s);
        // HTTP/1.1 clients may send their next requests before reading this answer; without
        // this Pingora answers the first and closes, dropping the rest. Answers go out in
        // order, one request at a time (RFC 9112 §9.3.2); the flag carries over keep-alive.
        s.set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, s: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A client that stops reading must not pin an upstream (or a sidecar slot) forever:
        // a write that cannot progress for this long fails, and the upstream is dropped.
        s.set_write_timeout(Some(DOWNSTREAM_WRITE_TIMEOUT));
        ctx.gauge = Some(InFlightGauge::enter(&self.metrics.in_flight));
        let config = self.config.load_full();
        ctx.request_id = match s.req_header().headers.get("x-request-id") {
            Some(id) if accept_request_id(id) => id.clone(),
            _ => new_request_id(),
        };
        ctx.response_headers.push((
            HeaderName::from_static("x-request-id"),
            ctx.request_id.clone(),
        ));
        if let Some(cors) = &config.cors {
            cors.on_response(s.req_header(), &mut ctx.response_headers);
            if let Decision::Respond(resp) = cors.on_request(s.req_header()) {
                ctx.config = Some(config);
                write_plugin_response(s, ctx, resp).await?;
                return Ok(true);
            }
        }
        ctx.config = Some(config);

        let (req, route, plan) = match self.admit(s, ctx).await {
            Ok(Admit::Reply(reply)) => {
                self.write_reply(s, ctx, reply.status, reply.body).await?;
                return Ok(true);
            }
            Ok(Admit::Hit(plan, entry)) => {
                cache::serve(s, ctx, &plan, &entry).await?;
                return Ok(true);
            }
            Ok(Admit::Job(call, principal)) => {
                return self.serve_job(s, ctx, call, principal).await;
            }
            Ok(Admit::Forward(req, route, plan)) => (req, route, plan),
            Err(e) => {
                self.write_error(s, ctx, &e).await?;
                return Ok(true);
            }
        };
        if let Some(plan) = plan.as_ref() {
            if plan.items.is_some() {
                return self.embeddings_by_item(s, ctx, &req, &route, plan).await;
            }
            if plan.control != ClientControl::Bypass && self.coalesce(s, ctx, plan).await? {
                return Ok(true);
            }
        }
        let upstreams = Upstreams {
            health: &self.health,
            quotas: &self.quotas,
            metrics: &self.metrics,
            drain: &self.drain,
        };
        match self
            .forwarder
            .forward(s, ctx, &req, &route, &upstreams)
            .await
        {
            Ok(()) => {
                if let Some(fill) = ctx.fill.take() {
                    self.cache_store(fill.finish().into_iter().collect());
                }
                Ok(true)
            }
            Err(e) => self.forward_failed(s, ctx, e).await,
        }
    }

    async fn upstream_peer(
        &self,
        _s: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // request_filter always answers; Pingora's own upstream phase never runs.
        Error::e_explain(ErrorType::InternalError, "lumen forwards requests itself")
    }

    async fn fail_to_proxy(&self, s: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        // Reached for errors Pingora saw itself (bad request heads) or that we returned after
        // the response started. Answer in OpenAI's shape when nothing was written yet.
        // An interim `100 Continue` is not an answer: the client still waits for one.
        // Nobody is left to answer when the client's connection is closed or broken.
        let gone = matches!(
            e.etype(),
            ErrorType::WriteError | ErrorType::ConnectionClosed
        );
        if !gone
            && s.response_written()
                .is_none_or(|h| h.status.is_informational())
        {
            let err = match e.esource() {
                ErrorSource::Downstream => {
                    GatewayError::Request(RequestError::ReadBody(e.etype().as_str().into()))
                }
                _ => GatewayError::Internal(e.etype().as_str().into()),
            };
            let _ = self.write_error(s, ctx, &err).await;
        }
        FailToProxy {
            error_code: ctx.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, s: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // Answered: the connection idles toward `server.keepalive_timeout` from here.
        crate::conn::request_finished(s);
        // The fleet-wide slot is given back before this connection reads its next request (a
        // client's next call must find it free); were this future dropped, the guard would.
        if let Some(slot) = ctx.shared_slot.take() {
            slot.release().await;
        }
        if let Some(hold) = ctx.tokens.take() {
            // Settle with what the provider reported; else what was streamed (a client that
            // left mid-stream pays for what was generated). No answer: nothing used.
            let reserved = match &hold {
                TokenHold::Local(r) => r.reserved,
                TokenHold::Shared(r) => r.reserved(),
            };
            let actual = match ctx.usage_total.or(ctx.usage_estimate) {
                Some(total) => total,
                None if ctx.status == 200 => reserved,
                None => 0,
            };
            self.settle_tokens(hold, actual).await;
        }
        let elapsed = ctx.started.elapsed();
        let endpoint = ctx.endpoint.map_or("none", Endpoint::label);
        let route = ctx.route.as_deref().unwrap_or("");
        let provider = ctx.provider.as_deref().unwrap_or("");
        let status = StatusCode::from_u16(ctx.status).ok();
        let status = status.as_ref().map_or("0", StatusCode::as_str);
        self.metrics
            .requests
            .with_label_values(&[endpoint, route, provider, status])
            .inc();
        if let Some((prompt, completion)) = ctx.usage_split {
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                self.metrics
                    .tokens
                    .with_label_values(&[ctx.key_label(), provider, route, kind])
                    .inc_by(n);
            }
        }
        if ctx.endpoint.is_some() {
            self.metrics
                .overhead
                .with_label_values(&[endpoint])
                .observe(ctx.overhead().as_secs_f64());
        }
        if let Some(result) = ctx.cache {
            self.metrics.cache.with_label_values(&[route, result]).inc();
        }
        if let (Some(model), Some(principal)) = (&ctx.model, &ctx.principal) {
            let (prompt_tokens, completion_tokens) = ctx.usage_split.unwrap_or((0, 0));
            self.ledger.record(&ledger::Event {
                key: &principal.key_id,
                provider,
                model,
                prompt_tokens,
                completion_tokens,
                error: ctx.status >= 400 || ctx.status == 0 || ctx.error.is_some(),
                cache_hit: matches!(ctx.cache, Some("hit" | "coalesced")),
            });
        }
        if let (true, Some(committed)) = (ctx.stream, ctx.committed_at) {
            self.metrics
                .ttft
                .with_label_values(&[endpoint, route])
                .observe(
                    committed
                        .saturating_duration_since(ctx.started)
                        .as_secs_f64(),
                );
        }
        if ctx.endpoint.is_some() {
            self.metrics
                .duration
                .with_label_values(&[endpoint, route])
                .observe(elapsed.as_secs_f64());
        }
        if ctx.config.as_ref().is_none_or(|c| c.server.access_log) {
            // The query string is never logged: it may carry credentials.
            access_log::record(&access_log::Entry {
                request_id: ctx.request_id.to_str().unwrap_or(""),
                key_id: ctx.principal.as_ref().map_or("", |p| p.key_id.as_str()),
                method: s.req_header().method.as_str(),
                path: s.req_header().uri.path(),
                status: ctx.status,
                endpoint,
                route,
                provider,
                stream: ctx.stream,
                duration_us: elapsed.as_micros() as u64,
                first_byte_us: ctx.first_byte.map_or(0, |d| d.as_micros() as u64),
                error: ctx.error.as_deref().unwrap_or(""),
            });
        }
    }
}

/// Writes a response a policy produced (e.g. a CORS preflight answer).
async fn write_plugin_response(
    s: &mut Session,
    ctx: &mut RequestCtx,
    resp: http::Response<Vec<u8>>,
) -> Result<()> {
    let (parts, body) = resp.into_parts();
    let mut head =
        ResponseHeader::build(parts.status, Some(parts.headers.len().saturating_add(2)))?;
    for (name, value) in parts.headers.iter() {
        head.append_header(name.clone(), value.clone())?;
    }
    head.insert_header(CONTENT_LENGTH, body.len())?;
    head.insert_header("x-request-id", ctx.request_id.clone())?;
    ctx.status = parts.status.as_u16();
    s.write_response_header(Box::new(head), body.is_empty())
        .await?;
    if !body.is_empty() {
        s.write_response_body(Some(Bytes::from(body)), true).await?;
    }
    Ok(())
}

/// The address a per-address limit counts: the peer, or behind a trusted proxy the client it
/// names in `X-Forwarded-For`; IPv6 cut to its `ipv6_prefix`. A peer without an IP address
/// (none on public listeners) counts as `::`.
fn client_address(s: &Session, trusted: &[Cidr], ipv6_prefix: u8) -> std::net::IpAddr {
    let peer = s
        .client_addr()
        .and_then(|a| a.as_inet())
        .map_or(std::net::Ipv6Addr::UNSPECIFIED.into(), |a| a.ip());
    let forwarded = s
        .req_header()
        .headers
        .get_all("x-forwarded-for")
        .iter()
        // Not visible ASCII: not an address, which ends the walk like any garbage entry.
        .map(|v| v.to_str().unwrap_or("unknown"));
    address::bucket_of(address::client_ip(peer, forwarded, trusted), ipv6_prefix)
}

/// Whether the request names this machine without DNS (`localhost` or an IP literal, as the
/// admin listener requires without `admin_key`): a browser tricked by DNS rebinding sends the
/// attacker's name. No Host at all (HTTP/1.0) is not a browser.
fn host_is_local(head: &pingora::http::RequestHeader) -> bool {
    let host = head
        .headers
        .get(http::header::HOST)
        .map(|h| h.to_str().unwrap_or(""))
        .or_else(|| head.uri.authority().map(|a| a.as_str()));
    host.is_none_or(crate::admin::local_host)
}

/// A body sent without `Content-Type: application/json` (or `…+json`) is refused (415): a web
/// page can make a browser send `text/plain` or a form cross-site without asking, but not JSON.
/// A body over the size limit is left to the 413 that follows; a request without a body passes.
fn json_body_required(
    head: &pingora::http::RequestHeader,
    max_body_bytes: usize,
) -> Result<(), GatewayError> {
    let length = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.headers.contains_key(http::header::TRANSFER_ENCODING);
    if (length.unwrap_or(0) == 0 && !chunked) || length.is_some_and(|n| n > max_body_bytes) {
        return Ok(());
    }
    let json = head
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    if json {
        Ok(())
    } else {
        Err(RequestError::NotJson.into())
    }
}

/// `X-API-Key` made from `?api_key=` when the request carries no credential header.
fn query_api_key(headers: &http::HeaderMap, query: Option<&str>) -> Option<http::HeaderMap> {
    if headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key("x-api-key") {
        return None;
    }
    let value = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("api_key="))?;
    let mut with_key = headers.clone();
    with_key.insert("x-api-key", HeaderValue::from_str(value).ok()?);
    Some(with_key)
}

/// The shared Redis link and key prefix, when `redis:` is configured and its URL is valid.
fn shared_link(
    shared: &Option<(Arc<SharedLimiter>, OnRedisError)>,
    snapshot: &Snapshot,
) -> Option<(Arc<RedisLink>, String)> {
    shared
        .as_ref()
        .zip(snapshot.redis.as_ref())
        .map(|((limiter, _), r)| (limiter.link().clone(), r.prefix.clone()))
}
