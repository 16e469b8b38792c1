//! A request in another API than the target's (a Responses or Messages request to a chat
//! completions target, DESIGN.md step 6): its answer is translated back, a stream event by
//! event while it flows, a whole answer once it is here. The request itself was translated
//! when it was parsed (`openai::parse`).

// Reachable from the network: no panics (issue 16).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::{SystemTime, UNIX_EPOCH};

use crate::session::Session;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use pingora::prelude::*;

use super::ctx::RequestCtx;
use super::forward::{Captured, TranslatedStream, Watchers};
use super::gateway::Gateway;
use crate::error::{GatewayError, UpstreamError};
use crate::openai::{Endpoint, LlmRequest};
use crate::stored::Keep;
use crate::translate::answer::Answer;
use crate::translate::{messages, responses};

/// Most bytes of a whole answer kept for its translation.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Sets up the translation of an answer (`answer`, from [`answer`]): `watch` translates a
/// stream as it flows, or captures a whole answer.
pub(super) fn watch(answer: &Answer, stream: bool, watch: &mut Watchers) {
    if stream {
        watch.translating(TranslatedStream::new(answer.clone()));
    } else {
        watch.capture(MAX_ANSWER);
    }
}

/// What `req`'s answer says of itself in the client's API (`None` for an untranslated
/// request), and a Responses answer to store set up in `ctx`. (The fields a translation left
/// out are named by the attempt whose target answered: `forward::stream`.)
pub(super) fn answer(ctx: &mut RequestCtx, req: &LlmRequest) -> Option<Answer> {
    let original = req.original.as_ref()?;
    let id = ctx.request_id.to_str().unwrap_or_default();
    let answer = match req.endpoint {
        Endpoint::Messages => Answer::Messages(messages::Meta::new(format!("msg_{id}"), original)),
        _ => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let id = format!("resp_{id}");
            if !req.counting {
                ctx.keep = Keep::of(req, &id);
            }
            Answer::Responses(responses::Meta::new(id, now, original))
        }
    };
    Some(answer)
}

impl Gateway {
    /// Sends a whole translated answer (a stream went out as it came). An error answer is
    /// passed on in the client's API's error shape (OpenAI's is the Responses API's too).
    pub(super) async fn send_translated(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        answer: &Answer,
        watch: &mut Watchers,
    ) -> Result<()> {
        let Some(Captured {
            head: Some(mut head),
            body,
            ..
        }) = watch.capture.take()
        else {
            // A stream: already sent.
            return Ok(());
        };
        let body = body.freeze();
        let body = if watch.native() {
            // The provider speaks the client's API: its answer is the client's as it is.
            body
        } else if head.status.is_success() {
            match serde_json::from_slice(&body) {
                Ok(chat) => {
                    let translated = answer.from_chat_json(&chat);
                    if let Some(keep) = ctx.keep.as_mut() {
                        // A tree only for a response that is stored.
                        keep.response = serde_json::from_slice(&translated).ok();
                        self.keep_response(ctx).await;
                    }
                    Bytes::from(translated)
                }
                Err(_) => {
                    let error = GatewayError::Upstream(UpstreamError::Mismatch {
                        provider: ctx.provider.clone().unwrap_or_default(),
                        detail: "the provider's answer is not JSON".into(),
                    });
                    return self.write_error(s, ctx, &error).await;
                }
            }
        } else {
            match answer.error(head.status.as_u16(), &body) {
                Some(error) => Bytes::from(serde_json::to_vec(&error).unwrap_or_default()),
                None => body,
            }
        };
        head.remove_header(&http::header::TRANSFER_ENCODING);
        head.insert_header(CONTENT_LENGTH, body.len())?;
        // Settled when the provider's answer was complete: what it cost is known.
        if let Some(cost) = ctx.cost.filter(|_| head.status.is_success()) {
            head.insert_header(
                lumen_plugins::budget::X_LUMEN_COST,
                lumen_plugins::budget::format_usd(cost),
            )?;
        }
        ctx.status = head.status.as_u16();
        let write = async {
            s.write_response_header(head, false).await?;
            s.write_response_body(Some(body), true).await?;
            Result::<()>::Ok(())
        };
        tokio::join!(biased; self.release(ctx), write).1
    }
}
