//! What a finished request leaves behind (DESIGN.md step 12): its metrics, its row in the usage
//! ledger, and one access-log line. Read-only over the request's state; runs in Pingora's
//! `logging` phase, after the answer went out.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use crate::session::Session;
use http::StatusCode;

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use crate::access_log;
use crate::ledger;
use crate::openai::Endpoint;

impl Gateway {
    /// Starts the request's trace (traces on, and not a probe: load balancers ask often).
    pub(super) fn begin_trace(&self, s: &Session, ctx: &mut RequestCtx) {
        let Some(telemetry) = &self.node.telemetry else {
            return;
        };
        let head = s.req_header();
        let path = head.uri.path();
        if crate::ops::is_probe(path) {
            return;
        }
        let started = crate::telemetry::spans::wall_clock(ctx.started);
        let trace = telemetry.begin(&head.headers, head.method.as_str(), path, started);
        // A worker running a job: the time it waited in the queue (said by the worker itself,
        // so believed only on the internal socket).
        let queued = head
            .headers
            .get(crate::jobs::run::JOB_QUEUED)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .filter(|_| self.on_internal_socket(s));
        let at = queued
            .and_then(|us| std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_micros(us)));
        if let Some(at) = at {
            trace.queue_wait(at);
        }
        ctx.trace = Some(trace);
    }

    /// Ends the request's trace with what it came to.
    fn end_trace(&self, ctx: &mut RequestCtx, cost: Option<u64>) {
        let Some(trace) = ctx.trace.take() else {
            return;
        };
        trace.finish(&crate::telemetry::spans::Finished {
            status: ctx.status,
            endpoint: ctx.endpoint,
            model: ctx.model.as_deref(),
            route: ctx.route_name(),
            provider: ctx.provider.as_deref(),
            key_id: ctx.principal.as_ref().map(|p| p.key_id.as_str()),
            usage: ctx.usage_split,
            cached_tokens: ctx.usage_detail.0,
            cache: ctx.cache,
            stream: ctx.stream,
            attempts: ctx.attempts,
            error: ctx.error.as_deref(),
            cost_micros: cost,
        });
    }

    /// Records the finished request in the metrics, the ledger and the access log.
    pub(super) fn observe(&self, s: &Session, ctx: &mut RequestCtx) {
        let elapsed = ctx.started.elapsed();
        let endpoint = ctx.endpoint.map_or("none", Endpoint::label);
        let route = ctx.route_name();
        let provider = ctx.provider.as_deref().unwrap_or("");
        let status = StatusCode::from_u16(ctx.status).ok();
        let status = status.as_ref().map_or("0", StatusCode::as_str);
        let cost = ctx.cost.or_else(|| super::money::cost_of(ctx));
        if let Some(micros) = cost.filter(|c| *c > 0) {
            self.metrics
                .cost
                .with_label_values(&[ctx.key_label(), provider, route])
                .inc_by(micros as f64 / 1e6);
        }
        match (ctx.endpoint, &ctx.route) {
            (Some(e), Some(r)) => {
                r.series
                    .count_request(&self.metrics, e, route, (provider, ctx.status, status))
            }
            _ => self
                .metrics
                .requests
                .with_label_values(&[endpoint, route, provider, status])
                .inc(),
        }
        if let Some((prompt, completion)) = ctx.usage_split {
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                self.metrics
                    .tokens
                    .with_label_values(&[ctx.key_label(), provider, route, kind])
                    .inc_by(n);
            }
        }
        if let Some(e) = ctx.endpoint {
            self.metrics
                .overhead_for(e)
                .observe(ctx.overhead().as_secs_f64());
        }
        if let Some(result) = ctx.cache {
            self.metrics.cache.with_label_values(&[route, result]).inc();
        }
        if let (Some(model), Some(principal)) = (&ctx.model, &ctx.principal) {
            let (prompt_tokens, completion_tokens) = ctx.usage_split.unwrap_or((0, 0));
            self.node.ledger.record(&ledger::Event {
                key: &principal.key_id,
                tenant: principal.tenant.as_deref().unwrap_or(""),
                provider,
                model,
                prompt_tokens,
                completion_tokens,
                cost_micros: cost.unwrap_or(0),
                error: ctx.status >= 400 || ctx.status == 0 || ctx.error.is_some(),
                cache_hit: matches!(ctx.cache, Some("hit" | "coalesced")),
            });
        }
        // A routed request records into its route's kept series; one refused before it had a
        // route (bad body, unknown model) is looked up under `route=""`.
        if let (Some(e), Some(r)) = (ctx.endpoint, &ctx.route) {
            if let (true, Some(committed)) = (ctx.stream, ctx.committed_at) {
                let ttft = committed.saturating_duration_since(ctx.started);
                r.series
                    .ttft(&self.metrics, e, route)
                    .observe(ttft.as_secs_f64());
            }
            r.series
                .duration(&self.metrics, e, route)
                .observe(elapsed.as_secs_f64());
        } else if let Some(e) = ctx.endpoint {
            self.metrics
                .duration
                .with_label_values(&[e.label(), route])
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
                cost_micros: cost,
                error: ctx.error.as_deref().unwrap_or(""),
            });
        }
        self.end_trace(ctx, cost);
    }
}
