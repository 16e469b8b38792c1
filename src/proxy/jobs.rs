//! The async jobs API on the proxy's listener (`/v1/jobs…`): submitting (the body read here,
//! within the same limits as any request), polling, waiting for an answer, and a job's events
//! as SSE. The engine itself (queue, workers) is `crate::jobs`.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;

use crate::session::Session;
use bytes::Bytes;
use http::HeaderValue;
use lumen_plugins::auth::Principal;
use pingora::prelude::*;

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use super::respond::read_body;
use crate::error::GatewayError;
use crate::jobs;

impl Gateway {
    /// Answers a jobs API call: JSON, an SSE stream of a job's progress, or (shape B) the
    /// answer once the job ends.
    pub(super) async fn serve_job(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        call: jobs::api::Call,
        principal: Arc<Principal>,
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
        let trace = ctx
            .trace
            .as_deref()
            .filter(|_| call.submits())
            .and_then(|t| t.headers().0.to_str().ok().map(str::to_string));
        let answer = jobs::api::answer(call, body, &principal, &config, &self.node.jobs, trace);
        match answer.await {
            Ok(jobs::api::Answer::Json(status, value)) => {
                self.write_reply(s, ctx, status, Bytes::from(value.to_string()))
                    .await?;
            }
            Ok(jobs::api::Answer::Wait(id, timeout)) => {
                let (status, value) =
                    jobs::api::wait(&self.node.jobs, &principal.key_id, &id, timeout).await;
                self.write_reply(s, ctx, status, Bytes::from(value.to_string()))
                    .await?;
            }
            Ok(jobs::api::Answer::Events(id, style)) => {
                ctx.status = 200;
                ctx.stream = true;
                jobs::api::stream(
                    s,
                    &ctx.response_headers,
                    &self.node.jobs,
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
}
