//! Admission: DESIGN.md's steps 1–10, one call each, in the order they run. A request refused
//! at a step never reaches the next: nothing is counted, read or reserved for it beyond that
//! step. Any `Err` is written as an OpenAI error by `respond::write_error`.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;
use std::time::SystemTime;

use crate::session::Session;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderValue;
use lumen_plugins::address::{self, Cidr};
use lumen_plugins::auth::{AuthError, AuthMode, Principal};
use lumen_plugins::cache::store::Entry;
use pingora::http::RequestHeader;

use super::cache::plan::{self, Plan};
use super::cache::push_status;
use super::ctx::RequestCtx;
use super::gateway::Gateway;
use super::money;
use super::respond::read_body;
use super::stored;
use crate::config::Snapshot;
use crate::error::{GatewayError, RequestError};
use crate::jobs;
use crate::openai::{self, Endpoint, LlmRequest};
use crate::ops;
use crate::routing::Route;
use crate::upstream::tokenize;

/// The caller when `auth: off`: may use every model.
static ANONYMOUS: std::sync::LazyLock<Arc<Principal>> =
    std::sync::LazyLock::new(|| Arc::new(Principal::anonymous()));

/// What admission decided.
pub(super) enum Admit {
    /// Answered by the gateway itself.
    Reply(ops::Reply),
    /// Answered from the cache.
    Hit(Plan, Arc<Entry>, LlmRequest),
    /// To be forwarded on this route (using the cache as planned).
    Forward(LlmRequest, Arc<Route>, Option<Plan>),
    /// A call on the async jobs API, by this caller.
    Job(jobs::api::Call, Arc<Principal>),
    /// A call on the Batch API (`/v1/files`, `/v1/batches`), by this caller.
    Batch(crate::batches::api::Call, Arc<Principal>),
}

impl Gateway {
    /// DESIGN.md's pipeline steps 1–10, in order, one call each; the statuses a step refuses
    /// with are beside it.
    pub(super) async fn admit(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Admit, GatewayError> {
        let config = ctx
            .config
            .clone()
            .ok_or_else(|| GatewayError::Internal("no config".into()))?;
        let internal = self.on_internal_socket(s);
        // 1. Probes: answered at once, no auth, never limited.
        if let Some(reply) = self.probe(s.req_header(), &config) {
            return reply.map(Admit::Reply);
        }
        // 2. Job token, on the internal socket only: a worker acts as its job's key.    401
        let job = self.job_owner(s.req_header(), &config, internal)?;
        if job.is_some() {
            ctx.job_token = s
                .req_header()
                .headers
                .get(jobs::run::JOB_TOKEN)
                .and_then(|t| t.to_str().ok())
                .map(Box::from);
            ctx.batch_line = ctx
                .job_token
                .as_deref()
                .is_some_and(|t| self.node.jobs.is_batch_line(t));
        }
        // 3. Per-address limit: floods are cut before any key is checked.               429
        if !internal {
            self.limit_address(s, ctx, &config).await?;
        }
        // 4. Authenticate; then the gateway's own answers for this caller: `/v1/models`,
        //    and the jobs API (which limits only submissions).       401, 403, 404, 405, 429
        let jobs_call = jobs::api::route(
            &s.req_header().method,
            s.req_header().uri.path(),
            &config.jobs,
        )
        .transpose()?;
        let open = config.auth.mode() == AuthMode::Off && !internal;
        let principal = authenticate(
            s.req_header(),
            &config,
            job.as_ref(),
            jobs_call.as_ref(),
            open,
        )?;
        ctx.principal = Some(principal.clone());
        if let Some(reply) = ops::answer(
            &s.req_header().method,
            s.req_header().uri.path(),
            &config,
            &principal,
        ) {
            return reply.map(Admit::Reply);
        }
        if let Some(call) = jobs_call {
            return Box::pin(self.admit_job(s.req_header(), ctx, &config, call, principal, open))
                .await;
        }
        //    The Batch API: uploads, creates and cancels count against the key's request
        //    limit; reads (an SDK polling its batch) do not.                      429
        let head = s.req_header();
        if let Some(call) = crate::batches::api::route(&head.method, head.uri.path()).transpose()? {
            if call.counts() && job.is_none() {
                self.limit(ctx, &principal).await?;
            }
            return Ok(Admit::Batch(call, principal));
        }
        // 5. Key rate limit (requests, concurrency): no body is read for a refusal.      429
        if job.is_none() {
            self.limit(ctx, &principal).await?;
        }
        //    Stored responses: read or deleted, the key's own only.                404, 503
        let head = s.req_header();
        if let Some(call) = stored::route(&head.method, head.uri.path()) {
            let query = head.uri.query().map(str::to_string);
            return Box::pin(self.answer_stored(call, &principal, query.as_deref()))
                .await
                .map(Admit::Reply);
        }
        // 6. Body: endpoint and method, then a bounded read, parsed once.
        //                                                         404, 405, 415, 413, 408, 400
        let req = read_request(s, ctx, &config, open).await?;
        // 7. Route: the allow-list first, then the route table.                         403, 404
        let route = resolve_route(ctx, &config, &principal, &req)?;
        if let Some(trace) = ctx.trace.as_mut() {
            trace.model(req.endpoint, &req.model);
            trace.input(&req.raw);
        }
        //    A Responses request continuing a stored one: the conversation so far; one only
        //    a provider speaking the Responses API can serve needs such a target.      400, 503
        let mut req = self.continue_stored(&principal, req, &route).await?;
        // 8. Route limit, per key.                                                      429
        self.limit_route(ctx, &principal, &route).await?;
        //    A sidecar target counts the prompt with its own tokenizer, for a token count or
        //    a token reservation (one local round trip; the estimate when it cannot answer).
        if req.counting
            || principal
                .limits
                .as_ref()
                .is_some_and(|l| !l.tokens.is_empty())
        {
            req.prompt_tokens = self.count_on_sidecar(&route, &req).await;
        }
        // A token count (Messages, Responses) is answered here: routed and limited like the
        // request it measures, but never forwarded, cached or charged tokens.
        if req.counting {
            return Ok(Admit::Reply(count_tokens(&req)));
        }
        // 9. Cache: a hit answers below (a request, but no provider call).
        let plan = plan::plan(&route, &req, &principal, s.req_header());
        let looked = ctx.trace.as_ref().map(|_| std::time::SystemTime::now());
        let hit = self.cache_hit(ctx, plan.as_ref()).await;
        if let (Some(trace), Some(looked), Some(_)) = (ctx.trace.as_deref(), looked, &plan) {
            trace.cache_lookup(looked, hit.is_some());
        }
        // 10. Token reservation: an estimate now, settled with real usage after. A hit costs
        //     tokens only when the route says so.                                        429
        //     Dollar budgets likewise: the worst case at the route's dearest target, settled
        //     with the real cost after; a hit costs nothing. Both at once (through Redis, two
        //     round trips in parallel); either refusal drops the other's reservation.     429
        let tokens = (hit.is_none() || plan.as_ref().is_some_and(|p| p.policy.charge_tokens))
            && principal
                .limits
                .as_ref()
                .is_some_and(|l| !l.tokens.is_empty());
        let money = hit.is_none() && money::has_budget(&principal, &config);
        //     A hedged route's request may send its prompt to more targets: one prompt more
        //     per possible hedge is reserved (none for a hit or a batch's line, which never
        //     hedge).
        let hedges = match &route.hedge {
            Some(h) if hit.is_none() && !ctx.batch_line => {
                (h.max as u64).min(route.targets.len().saturating_sub(1) as u64)
            }
            _ => 0,
        };
        if hedges > 0 {
            ctx.hedge_reserve = hedges.saturating_mul(req.token_split(0).0);
        }
        let (tokens, money) = match (tokens, money) {
            (true, true) => tokio::join!(
                self.reserve_tokens(&principal, &req, hedges),
                self.reserve_money(&principal, &req, &route, &config, hedges)
            ),
            (true, false) => (self.reserve_tokens(&principal, &req, hedges).await, None),
            (false, true) => (
                None,
                self.reserve_money(&principal, &req, &route, &config, hedges)
                    .await,
            ),
            (false, false) => (None, None),
        };
        self.hold_tokens(ctx, tokens)?;
        self.hold_money(ctx, money)?;
        match (hit, plan) {
            (Some(entry), Some(plan)) => {
                // Free, but a budgeted caller is still told where its budget stands.
                if money::has_budget(&principal, &config) {
                    self.peek_money(ctx, &principal, &config).await;
                }
                push_status(ctx, "hit");
                Ok(Admit::Hit(plan, entry, req))
            }
            (_, plan) => Ok(Admit::Forward(req, route, plan)),
        }
    }

    /// Step 1: `/healthz`, `/readyz`, `/health`.
    fn probe(
        &self,
        head: &RequestHeader,
        config: &Snapshot,
    ) -> Option<Result<ops::Reply, GatewayError>> {
        let redis = self.node.redis.as_ref().map(|r| &*r.link);
        ops::answer_probe(
            &head.method,
            head.uri.path(),
            config,
            &self.node.health,
            redis,
            &self.node.jobs,
        )
    }

    /// Step 2: the key a worker's job token stands for. Whose request limit was counted when
    /// the job was submitted; its token budget is reserved at step 10, as for anyone. Only on
    /// the internal socket: anywhere else the header means nothing (and is never forwarded),
    /// so it can neither skip the per-address limit nor authenticate.
    fn job_owner(
        &self,
        head: &RequestHeader,
        config: &Snapshot,
        internal: bool,
    ) -> Result<Option<Arc<Principal>>, GatewayError> {
        let Some(token) = head.headers.get(jobs::run::JOB_TOKEN).filter(|_| internal) else {
            return Ok(None);
        };
        match token.to_str().ok().and_then(|t| self.node.jobs.by_token(t)) {
            // A configured key is looked up again in this request's config: a key removed or
            // disabled by a reload since its job was queued runs nothing more (its limits and
            // allow-list are the current ones too).
            Some(owner) if owner.configured => config
                .auth
                .principal_by_id(&owner.key_id, SystemTime::now())
                .map(Some)
                .ok_or(GatewayError::Auth(AuthError::UnknownKey)),
            Some(owner) => Ok(Some(owner)),
            None => Err(GatewayError::Auth(AuthError::UnknownKey)),
        }
    }

    /// Step 4 for a jobs API call: a submission's body must be JSON when the listener is open
    /// (`auth: off`), and it counts against the key's request limit.
    async fn admit_job(
        &self,
        head: &RequestHeader,
        ctx: &mut RequestCtx,
        config: &Snapshot,
        call: jobs::api::Call,
        principal: Arc<Principal>,
        open: bool,
    ) -> Result<Admit, GatewayError> {
        if open && head.method == http::Method::POST {
            json_body_required(head, config.limits.max_body_bytes)?;
        }
        if call.submits() {
            self.limit(ctx, &principal).await?;
        }
        Ok(Admit::Job(call, principal))
    }

    /// Whether the request came in on this process's jobs socket (a Unix socket; every public
    /// listener is TCP).
    pub(super) fn on_internal_socket(&self, s: &Session) -> bool {
        s.server_addr()
            .and_then(|a| a.as_unix())
            .and_then(|u| u.as_pathname())
            .is_some_and(|path| path == self.internal_socket)
    }
}

/// Step 4: who is calling. A job's worker is its job's key; otherwise the credential headers
/// (or, for a jobs event stream, `?api_key=`: a browser's EventSource cannot send headers).
/// With `auth: off` the listener's address is the only protection: what a web page could send
/// it (a DNS name re-pointed at us) is refused first.
fn authenticate(
    head: &RequestHeader,
    config: &Snapshot,
    job: Option<&Arc<Principal>>,
    jobs_call: Option<&jobs::api::Call>,
    open: bool,
) -> Result<Arc<Principal>, GatewayError> {
    if open && !host_is_local(head) {
        return Err(GatewayError::HostNotAllowed);
    }
    if let Some(owner) = job {
        return Ok(owner.clone());
    }
    let from_query = match jobs_call {
        Some(jobs::api::Call::Stream(_)) => query_api_key(&head.headers, head.uri.query()),
        _ => None,
    };
    let headers = from_query.as_ref().unwrap_or(&head.headers);
    Ok(config
        .auth
        .authenticate(headers, SystemTime::now())?
        .unwrap_or_else(|| ANONYMOUS.clone()))
}

/// Step 6: the endpoint and method from the head, then the body: bounded, read once, kept for
/// every attempt, and parsed for what routing and policy need.
async fn read_request(
    s: &mut Session,
    ctx: &mut RequestCtx,
    config: &Snapshot,
    open: bool,
) -> Result<LlmRequest, GatewayError> {
    let head = s.req_header();
    let path = head.uri.path();
    let counting = Endpoint::counting_path(path);
    let endpoint =
        Endpoint::from_path(path)
            .or(counting)
            .ok_or_else(|| GatewayError::UnknownEndpoint {
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
    let raw = read_body(s, config).await?;
    let req = match counting {
        Some(api) => openai::parse_counting(api, raw)?,
        None => openai::parse(endpoint, raw)?,
    };
    ctx.stream = req.stream;
    Ok(req)
}

/// The answer to a token count, in the API's own shape: the target's own count when it gave one
/// (a sidecar), else the prompt's estimated size.
fn count_tokens(req: &LlmRequest) -> ops::Reply {
    let tokens = req.prompt_tokens.unwrap_or_else(|| {
        let chat = serde_json::from_slice(&req.raw).unwrap_or(serde_json::Value::Null);
        crate::translate::estimate_prompt_tokens(&chat)
    });
    let body = match req.endpoint {
        Endpoint::Messages => serde_json::json!({"input_tokens": tokens}),
        _ => serde_json::json!({"object": "response.input_tokens", "input_tokens": tokens}),
    };
    ops::Reply::json(http::StatusCode::OK, &body)
}

impl Gateway {
    /// The prompt's tokens as counted by the route's first target, when it is a sidecar that
    /// is up; `None` otherwise, or when it did not answer in time.
    async fn count_on_sidecar(&self, route: &Route, req: &LlmRequest) -> Option<u64> {
        let target = route.targets.first()?;
        if req.untranslatable.is_some() || !self.node.health.get(&target.provider.name).is_sidecar()
        {
            return None;
        }
        let model = match &target.model_json {
            Some(json) => serde_json::from_slice::<String>(json).ok()?,
            None => req.model.clone(),
        };
        let body = tokenize::request_body(&req.raw, &model)?;
        // Boxed: an HTTP exchange's future is some kilobytes, and inline it would be part of
        // every request's future (moved, so copied, on every request), counted or not.
        match Box::pin(tokenize::count(&self.counter, &target.provider, body)).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::debug!(provider = %target.provider.name, error = %e, "sidecar token count failed; estimating");
                None
            }
        }
    }
}

/// Step 7: the route for the model asked for. The allow-list names what clients ask for, so it
/// is checked on the client's model, and before the route table: a key must not learn which
/// models exist beyond its own (403 for every model it may not use, existing or not).
fn resolve_route(
    ctx: &mut RequestCtx,
    config: &Snapshot,
    principal: &Principal,
    req: &LlmRequest,
) -> Result<Arc<Route>, GatewayError> {
    if !principal.may_use(&req.model) {
        return Err(GatewayError::ModelNotAllowed(req.model.clone()));
    }
    let route = config
        .routes
        .resolve(&req.model)
        .ok_or_else(|| GatewayError::ModelNotFound(req.model.clone()))?;
    ctx.route = Some(route.clone());
    ctx.model = Some(req.model.clone());
    Ok(route)
}

/// The address a per-address limit counts: the peer, or behind a trusted proxy the client it
/// names in `X-Forwarded-For`; IPv6 cut to its `ipv6_prefix`. A peer without an IP address
/// (none on public listeners) counts as `::`.
pub(super) fn client_address(s: &Session, trusted: &[Cidr], ipv6_prefix: u8) -> std::net::IpAddr {
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    //! The admit order, on a real Pingora session over an in-memory connection: a request
    //! refused at each step shows no trace of the steps after it (no body read, no route, no
    //! reservation).

    use std::time::Duration;

    use arc_swap::ArcSwap;
    use lumen_plugins::rate_limit::LimitReason;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::metrics::Metrics;

    const CONFIG: &str = r#"
listen: ["127.0.0.1:8080"]
keys:
  - { id: burst1, key: "sk-burst1", limits: { requests_per_minute: 60, burst: 1 } }
  - { id: fastonly, key: "sk-fastonly", models: [fast] }
  - { id: tokens, key: "sk-tokens", limits: { tokens_per_minute: 100000 } }
  - { id: tiny, key: "sk-tiny", limits: { tokens_per_minute: 10 } }
providers:
  mock: { base_url: "http://127.0.0.1:9/v1", health: { enabled: false } }
routes:
  - { model: fast, targets: [ { provider: mock } ] }
  - { model: narrow, targets: [ { provider: mock } ], limits: { requests_per_minute: 60, burst: 1 } }
"#;

    const BODY: &str =
        r#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;

    fn gateway(yaml: &str) -> Gateway {
        // The usage ledger's lock file goes to a scratch directory, not the working tree.
        let dir = std::env::temp_dir().join(format!("lumen-admit-{}", std::process::id()));
        let yaml = format!("usage: {{ state_dir: \"{}\" }}\n{yaml}", dir.display());
        let snapshot = crate::config::parse(&yaml, "test.yaml", |_| None).unwrap();
        Gateway::new(
            Arc::new(ArcSwap::from_pointee(snapshot)),
            Arc::new(Metrics::new()),
        )
    }

    /// Admits one request: `key` (if any), a chat completion whose head declares `body`'s
    /// length, and `body` sent only when `send_body`. The client end is returned so the
    /// connection stays open. Times out (fails) if admission waits on a body never sent.
    async fn admit(
        gw: &Gateway,
        key: Option<&str>,
        body: &str,
        send_body: bool,
    ) -> (Result<Admit, GatewayError>, RequestCtx, DuplexStream) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{auth}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        client.write_all(head.as_bytes()).await.unwrap();
        if send_body {
            client.write_all(body.as_bytes()).await.unwrap();
        }
        let mut s = Session::new_h1(Box::new(server));
        assert!(s.read_request().await.unwrap());
        let mut ctx = RequestCtx::new();
        ctx.config = Some(gw.config.load_full());
        let admitted = tokio::time::timeout(Duration::from_secs(5), gw.admit(&mut s, &mut ctx))
            .await
            .expect("admission waited on something it should not have");
        (admitted, ctx, client)
    }

    fn has_header(ctx: &RequestCtx, name: &str) -> bool {
        ctx.response_headers.iter().any(|(k, _)| k.as_str() == name)
    }

    #[tokio::test]
    async fn a_request_admitted_passes_every_step() {
        let gw = gateway(CONFIG);
        let (admitted, ctx, _c) = admit(&gw, Some("sk-tokens"), BODY, true).await;
        assert!(matches!(admitted, Ok(Admit::Forward(..))));
        assert_eq!(ctx.route_name(), "fast");
        assert!(ctx.tokens.is_some(), "tokens reserved at step 10");
    }

    #[tokio::test]
    async fn refused_at_the_address_limit_is_never_authenticated() {
        let gw = gateway(&CONFIG.replace(
            "keys:",
            "limits: { per_ip: { requests_per_minute: 1, burst: 1 } }\nkeys:",
        ));
        let mut refused = None;
        for _ in 0..5 {
            let (admitted, ctx, _c) = admit(&gw, None, BODY, false).await;
            match admitted {
                Err(GatewayError::RateLimited(LimitReason::Requests)) => {
                    refused = Some(ctx);
                    break;
                }
                // Until the address is limited, the missing key is what refuses it.
                Err(GatewayError::Auth(_)) => {}
                _ => panic!("expected a 401 or a 429"),
            }
        }
        let ctx = refused.expect("the address limit refuses within 5 requests");
        assert!(ctx.principal.is_none(), "step 3 refuses before step 4");
    }

    #[tokio::test]
    async fn refused_at_authentication_reads_no_body() {
        let gw = gateway(CONFIG);
        let (admitted, ctx, _c) = admit(&gw, None, BODY, false).await;
        assert!(matches!(admitted, Err(GatewayError::Auth(_))));
        assert!(ctx.endpoint.is_none() && ctx.route.is_none());
    }

    #[tokio::test]
    async fn refused_at_the_key_limit_reads_no_body() {
        let gw = gateway(CONFIG);
        let (first, _, _c) = admit(&gw, Some("sk-burst1"), BODY, true).await;
        assert!(first.is_ok());
        // The body is declared but never sent: a step that read it would wait forever.
        let (admitted, ctx, _c) = admit(&gw, Some("sk-burst1"), BODY, false).await;
        assert!(matches!(
            admitted,
            Err(GatewayError::RateLimited(LimitReason::Requests))
        ));
        assert!(ctx.endpoint.is_none(), "step 5 refuses before step 6");
        assert!(has_header(&ctx, "retry-after"));
    }

    #[tokio::test]
    async fn a_bad_body_is_refused_before_the_route_is_looked_at() {
        let gw = gateway(CONFIG);
        // A model this key may not use, in a body that is not JSON: the body is judged first.
        let (admitted, ctx, _c) =
            admit(&gw, Some("sk-fastonly"), r#"{"model":"other","#, true).await;
        assert!(matches!(admitted, Err(GatewayError::Request(_))));
        assert!(ctx.route.is_none() && ctx.model.is_none());
    }

    #[tokio::test]
    async fn refused_at_the_route_reserves_nothing() {
        let gw = gateway(CONFIG);
        let body = BODY.replace("fast", "other");
        let (admitted, ctx, _c) = admit(&gw, Some("sk-fastonly"), &body, true).await;
        assert!(matches!(admitted, Err(GatewayError::ModelNotAllowed(_))));
        assert!(ctx.route.is_none() && ctx.tokens.is_none());
    }

    #[tokio::test]
    async fn refused_at_the_route_limit_reserves_no_tokens() {
        let gw = gateway(CONFIG);
        let body = BODY.replace("fast", "narrow");
        let (first, _, _c) = admit(&gw, Some("sk-tokens"), &body, true).await;
        assert!(first.is_ok());
        let (admitted, ctx, _c) = admit(&gw, Some("sk-tokens"), &body, true).await;
        assert!(matches!(
            admitted,
            Err(GatewayError::RateLimited(LimitReason::Requests))
        ));
        assert_eq!(ctx.route_name(), "narrow", "step 7 ran");
        assert!(ctx.tokens.is_none(), "step 8 refuses before step 10");
        assert!(!has_header(&ctx, "x-ratelimit-remaining-tokens"));
    }

    #[tokio::test]
    async fn refused_at_the_token_reservation_forwards_nothing() {
        let gw = gateway(CONFIG);
        let (admitted, ctx, _c) = admit(&gw, Some("sk-tiny"), BODY, true).await;
        assert!(matches!(
            admitted,
            Err(GatewayError::RateLimited(LimitReason::Tokens))
        ));
        assert!(ctx.tokens.is_none());
    }
}
