//! The request pipeline. Lumen serves HTTP itself ([`Proxy`], frame.rs, an `HttpServerApp` on
//! Pingora's listeners and sessions): Pingora reads the request head, and everything happens
//! from [`Gateway::serve`] on; the response is always written here. DESIGN.md's steps, in the
//! order they run (the statuses a step refuses with in brackets):
//!
//! ```text
//! serve
//!   admit (admit.rs)
//!     1  probes              /healthz /readyz /health, no auth, never limited
//!     2  job token           internal socket only: a worker acts as its job's key   [401]
//!     3  per-address limit   limits.per_ip (limits.rs)                               [429]
//!     4  authenticate        key or JWT → Principal; /v1/models, the jobs API (jobs.rs) [401]
//!     5  key rate limit      requests and concurrency, before any body is read       [429]
//!     6  body                endpoint, method, bounded read, parse   [404 405 415 413 408 400]
//!     7  route               allow-list first, then the route table              [403 404]
//!     8  route limit         per key on the route (limits.rs)                        [429]
//!        prompt count        a sidecar target counts the prompt (upstream/tokenize.rs)
//!     9  cache               hit, bypass (cache/)                                    
//!     10 reserve tokens      the count or estimate, settled after (limits.rs)        [429]
//!   9  miss: embeddings item by item (cache/embeddings.rs), follow or lead a flight
//!   11 forward               targets, fallback, retries, streaming (forward/)   [502 503 504]
//! finish
//!   12 after                 metrics, ledger, access log (observe.rs); limits were given
//!                            back and tokens settled (limits.rs), and a miss's answer stored,
//!                            when the answer was complete, before the client had the last
//!                            of it (a client that asks again at once finds them so); what a
//!                            request that ended otherwise still holds is released here
//! ```
//!
//! Every error is written by one function, `respond::write_error`, in OpenAI's shape.
//!
//! | file | concern |
//! |---|---|
//! | `frame.rs` | the HTTP service: read the head, run the phases, reuse the connection |
//! | `gateway.rs` | the [`Gateway`] type and what it holds (a leaf) |
//! | `admit.rs` | steps 1–10, one call each |
//! | `limits.rs` | per-address, key, route and token limits; settling |
//! | `respond.rs` | replies, errors, reading the body |
//! | `observe.rs` | metrics, ledger, access log |
//! | `jobs.rs` | the async jobs API |
//! | `stored.rs` | stored responses: continuing one, keeping one, `GET`/`DELETE /v1/responses/{id}` |
//! | `translated.rs` | a translated request's answer, back in the client's API |
//! | `ctx.rs` | per-request state |
//! | `cache/` | hits, followers, the fill, embeddings by item |
//! | `forward/` | the attempt loop and streaming |
//!
//! Imports: everything below it (`node`, `config`, `routing`, `upstream`, `jobs`, `ledger`, the
//! plugins). Nothing imports `proxy` but `lib` and `node` (which takes the cache store).

mod admit;
mod batches;
pub mod cache;
pub mod ctx;
pub mod faults;
pub mod forward;
mod frame;
mod gateway;
mod jobs;
mod limits;
pub mod money;
mod observe;
mod respond;
mod stored;
mod translated;

use pingora::prelude::*;

use crate::error::{GatewayError, RequestError};
use crate::session::Session;
use admit::Admit;
use ctx::RequestCtx;
pub use frame::Proxy;
pub use gateway::Gateway;

/// The phases of one request, in the order [`Proxy`] runs them: [`serve`](Gateway::serve),
/// [`fail`](Gateway::fail) when it returned an error, then [`finish`](Gateway::finish).
impl Gateway {
    /// Steps 1–11: the request's head is in; the answer is written here, whatever it is.
    pub(super) async fn serve(&self, s: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        // HTTP/1.1 clients may send their next requests before reading this answer; without
        // this Pingora answers the first and closes, dropping the rest. Answers go out in
        // order, one request at a time (RFC 9112 §9.3.2); the flag carries over keep-alive.
        s.set_pipelining_enabled(true);
        // Every answer carries the request id and CORS headers; a preflight is answered here.
        if self.start(s, ctx).await? {
            return Ok(());
        }
        self.begin_trace(s, ctx);
        // A traced request's task knows its trace: the Redis calls it makes become its spans.
        let current = ctx
            .trace
            .as_deref()
            .and_then(crate::telemetry::RequestTrace::current);
        match current {
            // Boxed: the traced future holds the request's whole future beside its trace.
            Some(current) => {
                Box::pin(crate::telemetry::spans::within(
                    current,
                    self.serve_request(s, ctx),
                ))
                .await
            }
            None => self.serve_request(s, ctx).await,
        }
    }

    /// Steps 1–11 for a request that is not a preflight: admission, then the answer.
    async fn serve_request(&self, s: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        if s.req_header().method == http::Method::CONNECT {
            // A tunnel's framing is not a request's: refused, and the connection closed.
            s.set_keepalive(None);
            let e = GatewayError::MethodNotAllowed {
                method: "CONNECT".into(),
                path: s.req_header().uri.to_string(),
            };
            return Box::pin(self.write_error(s, ctx, &e)).await;
        }
        // 1–10: admission, one call per step (admit.rs).
        let (req, route, plan) = match self.admit(s, ctx).await {
            Ok(Admit::Forward(req, route, plan)) => (req, route, plan),
            Ok(Admit::Reply(reply)) => {
                return Box::pin(self.write_reply(s, ctx, reply.status, reply.body)).await;
            }
            Ok(Admit::Hit(plan, entry, req)) => {
                // Given back before the client has its answer (a hit reserves no tokens).
                self.release(ctx).await;
                // A translated request's hit is translated back like a provider's answer.
                let answer = translated::answer(ctx, &req);
                let rendered = cache::render(ctx, &plan, &entry, answer.as_ref())?;
                if let (Some(response), Some(keep)) =
                    (rendered.completed.clone(), ctx.keep.as_mut())
                {
                    keep.response = Some(response);
                    Box::pin(self.keep_response(ctx)).await;
                }
                return Box::pin(cache::write(s, rendered)).await;
            }
            Ok(Admit::Job(call, principal)) => {
                return Box::pin(self.serve_job(s, ctx, call, principal))
                    .await
                    .map(drop)
            }
            Ok(Admit::Batch(call, principal)) => {
                return Box::pin(self.serve_batch(s, ctx, call, principal)).await
            }
            Err(e) => return Box::pin(self.write_error(s, ctx, &e)).await,
        };
        // A translated request (Responses, Messages): its answer is translated back.
        let translation = translated::answer(ctx, &req);
        // 9, for a miss: embeddings item by item, or follow (or lead) an identical request.
        let Some(mut watch) = self
            .miss(s, ctx, &req, &route, plan.as_ref(), translation.as_ref())
            .await?
        else {
            return Ok(());
        };
        if let Some(answer) = &translation {
            translated::watch(answer, req.stream, &mut watch);
        }
        // 11. Forward: targets in order, fallback, retries, the answer streamed back.
        let forwarded = self
            .forwarder
            .forward(s, ctx, &req, &route, &self.upstreams(), &mut watch)
            .await;
        match forwarded {
            Ok(()) => {
                if let Some(answer) = &translation {
                    Box::pin(self.send_translated(s, ctx, answer, &mut watch)).await?;
                }
                // 12 (the rest is in `finish`): a complete answer is stored.
                self.cache_fill(watch);
                Ok(())
            }
            Err(e) => {
                // (Tests: everything the failed request holds, its watchers included, is
                // still held here.)
                faults::maybe_pause(s.req_header(), "forward-failed").await;
                Box::pin(self.forward_failed(s, ctx, e)).await.map(drop)
            }
        }
    }

    /// After [`serve`](Gateway::serve) returned `e`: errors Pingora saw itself (a broken
    /// request body) or that came up after the response started. Answered in OpenAI's shape
    /// when nothing was written yet; the connection is not reused.
    pub(super) async fn fail(&self, s: &mut Session, e: &Error, ctx: &mut RequestCtx) {
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
    }

    /// 12. The request has ended, however it ended.
    pub(super) async fn finish(&self, s: &Session, ctx: &mut RequestCtx) {
        // Answered: the connection idles toward `server.keepalive_timeout` from here.
        crate::conn::request_finished(s);
        // What a request that ended otherwise (a client gone, a stream cut, a follower)
        // still holds is given back; then metrics, the ledger and the access log.
        self.release(ctx).await;
        self.observe(s, ctx);
    }
}
