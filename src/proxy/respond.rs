//! Writing answers: a complete JSON reply, the one place an error becomes a response
//! (`write_error`, in OpenAI's shape, or Anthropic's for a Messages client), what the client sees of a forward that failed, a
//! policy's own answer (a CORS preflight), and reading the request body within its limits.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use crate::session::Session;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use lumen_plugins::Decision;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::ctx::{
    accept_request_id, edit_headers, new_request_id, InFlightGauge, RequestCtx, X_REQUEST_ID,
};
use super::forward::ForwardError;
use super::gateway::Gateway;
use crate::config::Snapshot;
use crate::error::{GatewayError, RequestError};

/// The access log's error for a request whose client went away.
pub(super) const CLIENT_GONE: &str = "client disconnected";

/// How long an unread request body is drained after an error before the connection closes.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Longest a response write may wait on a client that does not read.
const DOWNSTREAM_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Gateway {
    /// What every request gets before admission: the write timeout, the in-flight gauge, its
    /// config snapshot, its request id, and the CORS headers of whatever answer follows.
    /// `Ok(true)`: answered already (a CORS preflight).
    pub(super) async fn start(&self, s: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A client that stops reading must not pin an upstream (or a sidecar slot) forever:
        // a write that cannot progress for this long fails, and the upstream is dropped.
        s.set_write_timeout(Some(DOWNSTREAM_WRITE_TIMEOUT));
        ctx.gauge = Some(InFlightGauge::enter(&self.metrics.in_flight));
        // The head is in: the rest of this request is off the header clock. After the gauge: a
        // draining process sees a new connection's first request as unserved or in flight.
        crate::conn::request_started(s);
        let config = self.config.load_full();
        ctx.anthropic = s.req_header().uri.path().starts_with("/v1/messages");
        ctx.request_id = match s.req_header().headers.get("x-request-id") {
            Some(id) if accept_request_id(id) => id.clone(),
            _ => new_request_id(),
        };
        ctx.response_headers
            .push((X_REQUEST_ID, ctx.request_id.clone()));
        if let Some(cors) = &config.cors {
            cors.on_response(s.req_header(), &mut ctx.response_headers);
            if let Decision::Respond(resp) = cors.on_request(s.req_header()) {
                ctx.config = Some(config);
                write_plugin_response(s, ctx, resp).await?;
                return Ok(true);
            }
        }
        ctx.config = Some(config);
        Ok(false)
    }

    /// Writes a complete response: status, JSON body, and the request's own headers.
    pub(super) async fn write_reply(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        status: StatusCode,
        body: Bytes,
    ) -> Result<()> {
        self.write_typed_reply(s, ctx, status, "application/json", body)
            .await
    }

    /// [`Self::write_reply`] with another content type (a stored file's bytes).
    pub(super) async fn write_typed_reply(
        &self,
        s: &mut Session,
        ctx: &mut RequestCtx,
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<()> {
        let mut head = ResponseHeader::build_no_case(status, None)?;
        edit_headers(&mut head, |map| {
            map.reserve(ctx.response_headers.len().saturating_add(2));
            map.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            map.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            for (name, value) in &ctx.response_headers {
                map.append(name.clone(), value.clone());
            }
        });
        ctx.status = status.as_u16();
        let head_only = s.req_header().method == http::Method::HEAD;
        let write = async {
            s.write_response_header(Box::new(head), head_only).await?;
            if !head_only {
                s.write_response_body(Some(body), true).await?;
            }
            Result::<()>::Ok(())
        };
        // What the request holds is given back before the client has its answer (see
        // `forward::Settle`): polled first, so what is given back in this process is, and a
        // Redis call is on its way while the answer goes out.
        tokio::join!(biased; self.release(ctx), write).1?;
        // (Tests: the client has the whole answer; the request has not ended yet.)
        super::faults::maybe_pause(s.req_header(), "answer-sent").await;
        Ok(())
    }

    /// The one place an error becomes a response.
    pub(super) async fn write_error(
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
        let status = err.parts().status;
        let body = if ctx.anthropic {
            let error = crate::translate::messages::error_body(status.as_u16(), &err.to_string());
            serde_json::to_vec(&error).unwrap_or_default()
        } else {
            err.body()
        };
        self.write_reply(s, ctx, status, Bytes::from(body)).await?;
        if too_large {
            // Lingering close: keep reading and discarding briefly, so a client still sending
            // its body sees the 413 instead of a reset connection.
            let _ = tokio::time::timeout(LINGER, s.drain_request_body()).await;
        }
        Ok(())
    }

    /// What the client sees of a forward that failed.
    pub(super) async fn forward_failed(
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
}

/// Reads the whole request body, refusing more than `limits.max_body_bytes` bytes, and a body
/// still arriving `server.body_timeout` after its head (408). A body that arrives in one
/// piece (the common case) is kept as is, without a copy.
pub(super) async fn read_body(s: &mut Session, config: &Snapshot) -> Result<Bytes, RequestError> {
    read_body_within(s, config, config.limits.max_body_bytes).await
}

/// [`read_body`] with another bound than `limits.max_body_bytes` (a file upload's).
pub(super) async fn read_body_within(
    s: &mut Session,
    config: &Snapshot,
    limit: usize,
) -> Result<Bytes, RequestError> {
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
