//! Sending a request to a provider and streaming its answer back to the client.
//!
//! We own this loop instead of letting Pingora's proxy phases drive it (DESIGN.md, step 8):
//! Pingora replays a request body only from a 64 KiB retry buffer and commits to an upstream
//! once its response head is read, while LLM prompts are often larger and falling back after a
//! 429/503 is the point of a gateway. Here the body is already in memory (read once, bounded),
//! each attempt writes its own rewritten copy through a pooled connection from Pingora's
//! `Connector`, and only a response we accept is written downstream, chunk by chunk as it
//! arrives (SSE is never buffered).

use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::config::Provider;
use crate::ctx::RequestCtx;
use crate::error::{GatewayError, UpstreamError};
use crate::metrics::Metrics;
use crate::openai::{body_for_target, body_with_usage, LlmRequest};
use crate::routing::Route;
use crate::usage::UsageTap;

/// How a forward failed, which decides who writes what to the client.
#[derive(Debug)]
pub enum ForwardError {
    /// Nothing reached the client yet: the pipeline answers with this error.
    BeforeResponse(GatewayError),
    /// The response head (and maybe part of the body) went out, then the upstream failed. For
    /// SSE an error event was written and the stream closed cleanly; otherwise the connection
    /// must be dropped so the truncation is visible.
    AfterResponse { error: UpstreamError, sse: bool },
    /// The client went away; the upstream connection is dropped so generation stops.
    ClientGone,
}

/// Request headers never passed on to a provider: hop-by-hop headers, headers we set
/// ourselves, and the client's credentials (the gateway authenticates clients; providers only
/// ever see the provider key).
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "openai-organization",
    "openai-project",
    "x-goog-api-key",
    "x-request-id",
    // We read usage from responses, so ask for them uncompressed.
    "accept-encoding",
];

/// Response headers from the provider that describe its connection to us, not the answer.
const NOT_RETURNED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "x-request-id",
];

/// Idle keep-alive connections kept across all providers. Many concurrent streams finish at
/// once; a small pool would close most of their connections only to reopen them.
const UPSTREAM_POOL_SIZE: usize = 1024;

/// The upstream side: a pool of keep-alive connections shared by all requests.
pub struct Forwarder {
    connector: Connector,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder::new()
    }
}

impl Forwarder {
    pub fn new() -> Forwarder {
        Forwarder {
            connector: Connector::new(Some(ConnectorOptions::new(UPSTREAM_POOL_SIZE))),
        }
    }

    /// Sends `req` to the route's target and streams the response to the client.
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: &LlmRequest,
        route: &Route,
        metrics: &Metrics,
    ) -> Result<(), ForwardError> {
        // Strategies and fallback across targets come with the routing issue; the route's
        // first target is the primary.
        let Some(target) = route.targets.first() else {
            return Err(ForwardError::BeforeResponse(GatewayError::Internal(
                format!("route `{}` has no target", route.name),
            )));
        };
        let provider = &*target.provider;
        ctx.provider = Some(provider.name.clone());
        let body = if ctx.track_usage {
            body_with_usage(req, target.model_json.as_ref())
        } else {
            body_for_target(req, target.model_json.as_ref())
        };
        let head = upstream_request(session.req_header(), provider, req, &body, &ctx.request_id)
            .map_err(ForwardError::BeforeResponse)?;

        let sent = Instant::now();
        let peer = provider.peer.peer().await.map_err(|_| {
            ForwardError::BeforeResponse(
                UpstreamError::Connect {
                    provider: provider.name.clone(),
                }
                .into(),
            )
        })?;
        let mut upstream = self
            .exchange(provider, &peer, head, &body)
            .await
            .map_err(|e| {
                metrics
                    .upstream_errors
                    .with_label_values(&[&provider.name, error_kind(&e)])
                    .inc();
                ForwardError::BeforeResponse(e.into())
            })?;
        let first_byte = sent.elapsed();
        ctx.first_byte = Some(first_byte);
        metrics
            .first_byte
            .with_label_values(&[&provider.name])
            .observe(first_byte.as_secs_f64());

        let Some(upstream_head) = upstream.response_header() else {
            return Err(ForwardError::BeforeResponse(
                UpstreamError::Protocol {
                    provider: provider.name.clone(),
                }
                .into(),
            ));
        };
        let sse = upstream_head
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let mut head = Box::new(upstream_head.clone());
        for name in NOT_RETURNED {
            head.remove_header(*name);
        }
        add_headers(&mut head, &ctx.response_headers);
        let _ = head.insert_header("x-lumen-provider", provider.name.as_str());
        ctx.status = head.status.as_u16();
        ctx.stream = sse;

        if session.write_response_header(head, false).await.is_err() {
            return Err(ForwardError::ClientGone);
        }
        let mut tap = (ctx.track_usage && ctx.status < 300).then(|| UsageTap::new(sse));
        loop {
            match upstream.read_response_body().await {
                Ok(Some(chunk)) => {
                    if let Some(tap) = tap.as_mut() {
                        tap.observe(&chunk);
                    }
                    if session
                        .write_response_body(Some(chunk), false)
                        .await
                        .is_err()
                    {
                        return Err(ForwardError::ClientGone);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let error = classify(provider, &e);
                    metrics
                        .upstream_errors
                        .with_label_values(&[&provider.name, error_kind(&error)])
                        .inc();
                    if sse {
                        // A clean, parseable end rather than a silent truncation: OpenAI SDKs
                        // raise on an `error` object in the stream.
                        let event = sse_error_event(&error);
                        let _ = session.write_response_body(Some(event), true).await;
                    }
                    return Err(ForwardError::AfterResponse { error, sse });
                }
            }
        }
        ctx.usage_total = tap.as_mut().and_then(UsageTap::total_tokens);
        if session.write_response_body(None, true).await.is_err() {
            return Err(ForwardError::ClientGone);
        }
        self.connector
            .release_http_session(upstream, &*peer, Some(provider.idle_timeout))
            .await;
        Ok(())
    }

    /// Writes the request and reads the response head. A pooled connection the provider closed
    /// while idle fails on first use; that one case is retried once on a fresh connection.
    async fn exchange(
        &self,
        provider: &Provider,
        peer: &HttpPeer,
        head: RequestHeader,
        body: &[Bytes],
    ) -> Result<HttpSession, UpstreamError> {
        let mut stale_retry_left = true;
        loop {
            let (mut upstream, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| classify(provider, &e))?;
            // Pingora leaves per-read timeouts to the caller: `timeout` bounds the wait for the
            // response head and then for each body chunk.
            upstream.set_read_timeout(Some(provider.timeout));
            upstream.set_write_timeout(Some(provider.timeout));
            match send(&mut upstream, head.clone(), body).await {
                Ok(()) => return Ok(upstream),
                Err(e) if reused && stale_retry_left && is_stale_connection(&e) => {
                    stale_retry_left = false;
                }
                Err(e) => return Err(classify(provider, &e)),
            }
        }
    }
}

async fn send(
    upstream: &mut HttpSession,
    head: RequestHeader,
    body: &[Bytes],
) -> pingora::Result<()> {
    upstream.write_request_header(Box::new(head)).await?;
    for piece in body.iter().filter(|p| !p.is_empty()) {
        upstream.write_request_body(piece.clone(), false).await?;
    }
    upstream.finish_request_body().await?;
    upstream.read_response_header().await
}

/// A reused connection that turned out to be closed: safe to retry, the provider never
/// received the request.
fn is_stale_connection(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

fn classify(provider: &Provider, e: &pingora::Error) -> UpstreamError {
    let provider = provider.name.clone();
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            UpstreamError::Timeout { provider }
        }
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::HandshakeError
        | ErrorType::SocketError
        | ErrorType::ConnectProxyFailure => UpstreamError::Connect { provider },
        _ => UpstreamError::Protocol { provider },
    }
}

fn error_kind(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Connect { .. } => "connect",
        UpstreamError::Timeout { .. } => "timeout",
        UpstreamError::Protocol { .. } => "protocol",
    }
}

/// `data: {"error":{…}}` followed by a blank line: how a broken stream ends.
pub fn sse_error_event(error: &UpstreamError) -> Bytes {
    let body = GatewayError::from(error.clone()).body();
    let mut event = Vec::with_capacity(body.len() + 8);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

/// Builds the provider's request head: its path, host and credentials, the client's other
/// headers, and our request id.
fn upstream_request(
    client: &RequestHeader,
    provider: &Provider,
    req: &LlmRequest,
    body: &[Bytes],
    request_id: &HeaderValue,
) -> Result<RequestHeader, GatewayError> {
    let mut path = String::with_capacity(provider.base_path.len() + 24);
    path.push_str(&provider.base_path);
    path.push_str(req.endpoint.suffix());
    if let Some(query) = client.uri.query() {
        append_query(&mut path, query);
    }
    let internal =
        |e: pingora::BError| GatewayError::Internal(format!("building upstream request: {e}"));
    let mut head = RequestHeader::build(
        Method::POST,
        path.as_bytes(),
        Some(client.headers.len() + 6),
    )
    .map_err(internal)?;
    for (name, value) in client.headers.iter() {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            head.append_header(name.clone(), value.clone())
                .map_err(internal)?;
        }
    }
    let length: usize = body.iter().map(Bytes::len).sum();
    head.insert_header(HOST, provider.host.clone())
        .map_err(internal)?;
    head.insert_header(CONTENT_LENGTH, length)
        .map_err(internal)?;
    if !head.headers.contains_key(CONTENT_TYPE) {
        head.insert_header(CONTENT_TYPE, "application/json")
            .map_err(internal)?;
    }
    head.insert_header("x-request-id", request_id.clone())
        .map_err(internal)?;
    if let Some(auth) = &provider.authorization {
        head.insert_header(http::header::AUTHORIZATION, auth.clone())
            .map_err(internal)?;
    }
    for (name, value) in &provider.headers {
        head.insert_header(name.clone(), value.clone())
            .map_err(internal)?;
    }
    Ok(head)
}

/// Query parameters that carry a client's credential (Azure-style `?api-key=`, `?key=`):
/// like the `Authorization` header, they are for the gateway, never for a provider.
const CREDENTIAL_PARAMS: &[&str] = &[
    "api-key",
    "api_key",
    "apikey",
    "key",
    "access_token",
    "token",
];

/// Appends `query` to `path` without credential parameters.
fn append_query(path: &mut String, query: &str) {
    let mut first = true;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or("");
        if CREDENTIAL_PARAMS
            .iter()
            .any(|c| name.eq_ignore_ascii_case(c))
        {
            continue;
        }
        path.push(if first { '?' } else { '&' });
        path.push_str(pair);
        first = false;
    }
}

/// Appends the per-request headers (request id, CORS) to a response head.
pub fn add_headers(head: &mut ResponseHeader, headers: &[(HeaderName, HeaderValue)]) {
    for (name, value) in headers {
        let _ = head.append_header(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::append_query;

    #[test]
    fn credential_query_parameters_are_never_forwarded() {
        let mut path = String::from("/v1/chat/completions");
        append_query(
            &mut path,
            "api-version=2024-06-01&api-key=sk-secret&KEY=x&user=7",
        );
        assert_eq!(path, "/v1/chat/completions?api-version=2024-06-01&user=7");
        let mut path = String::from("/p");
        append_query(&mut path, "api_key=s");
        assert_eq!(path, "/p");
    }
}
