//! The Batch API on the proxy's listener (`/v1/files…`, `/v1/batches…`): the body read here
//! (an upload within `batches.max_file_bytes`, anything else within the usual body limit),
//! the answer written back. The files, batches and their driver are `crate::batches`.

// Reachable from the network: no panics (issue 16).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use lumen_plugins::auth::Principal;
use pingora::prelude::*;

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use super::respond::read_body_within;
use crate::batches::api::{self, Answer, Call};
use crate::batches::BatchError;
use crate::error::{GatewayError, RequestError};
use crate::session::Session;

impl Gateway {
    /// Answers a Batch API call.
    pub(super) async fn serve_batch(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        call: Call,
        principal: Arc<Principal>,
    ) -> Result<()> {
        let config = ctx
            .config
            .clone()
            .unwrap_or_else(|| self.config.load_full());
        let batches = &self.node.batches;
        let body = if s.req_header().method == http::Method::POST {
            let limit = if call.is_upload() {
                batches.settings.max_file_bytes
            } else {
                config.limits.max_body_bytes
            };
            match read_body_within(s, &config, limit).await {
                Ok(body) => Some(body),
                Err(RequestError::BodyTooLarge { limit }) if call.is_upload() => {
                    let e = GatewayError::from(BatchError::FileTooLarge { limit });
                    return self.write_error(s, ctx, &e).await;
                }
                Err(e) => return self.write_error(s, ctx, &GatewayError::from(e)).await,
            }
        } else {
            None
        };
        let head = s.req_header();
        let req = api::Request {
            body,
            content_type: head
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            query: head.uri.query(),
        };
        let answer = api::answer(call, req, &principal, batches).await;
        match answer {
            Ok(Answer::Json(status, value)) => {
                self.write_reply(s, ctx, status, Bytes::from(value.to_string()))
                    .await
            }
            Ok(Answer::Content(bytes)) => {
                self.write_typed_reply(s, ctx, StatusCode::OK, "application/octet-stream", bytes)
                    .await
            }
            Err(e) => self.write_error(s, ctx, &e).await,
        }
    }
}
