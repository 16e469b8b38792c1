//! A list of embeddings, cached item by item: cached items come from the cache, only the
//! others go upstream (the request rewritten to carry just them, the answer captured instead of
//! streamed), and the answer is merged back in the client's order.

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
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, StatusCode};
use lumen_plugins::cache::store::Entry;
use lumen_plugins::cache::ClientControl;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::plan::Plan;
use super::{push_status, usage_total};
use crate::error::{GatewayError, UpstreamError};
use crate::openai::{self, Endpoint, LlmRequest};
use crate::proxy::ctx::{add_headers, RequestCtx};
use crate::proxy::forward::{Captured, Watchers};
use crate::proxy::gateway::Gateway;
use crate::routing::Route;

/// Largest provider answer held to merge with cached embeddings.
const MAX_CAPTURED: usize = 64 * 1024 * 1024;

impl Gateway {
    /// A list embeddings request: cached items come from the cache, only the others go
    /// upstream (the request rewritten to carry just them), and the answer is merged back in
    /// the client's order.
    pub(super) async fn embeddings_by_item(
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
        // A Redis failure is counted by the Redis link; its items count as misses.
        let (mut found, _redis_failed) = if plan.control == ClientControl::Normal {
            self.node.cache.store.get_many(&items.keys).await
        } else {
            (vec![None; items.keys.len()], None)
        };
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
            push_status(ctx, "hit");
            provider = found
                .first()
                .and_then(|e| e.as_ref().map(|e| e.provider.clone()))
                .unwrap_or_default();
        } else {
            if plan.control != ClientControl::Bypass {
                push_status(ctx, "miss");
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
            let mut watch = Watchers::capturing(MAX_CAPTURED);
            let result = self
                .forwarder
                .forward(s, ctx, &sub, route, &self.upstreams(), &mut watch)
                .await;
            let captured = watch.capture.take();
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
                    let error = GatewayError::Upstream(UpstreamError::Mismatch {
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
        ctx.usage_total = usage_total(&merged);
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
}
