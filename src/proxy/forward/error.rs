//! How forwarding fails: [`ForwardError`] (which decides who writes what to the client), and
//! the mapping from Pingora's errors to [`UpstreamError`]s and retry [`Failure`]s. A leaf of
//! `forward`.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bytes::Bytes;
use pingora::ErrorType;

use crate::error::{GatewayError, UpstreamError};
use crate::upstream::provider::Provider;
use crate::upstream::retry::Failure;

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
    /// The node is shutting down and its grace period is ending: the stream was ended with a
    /// `server_shutting_down` event (says nothing about the provider).
    ShuttingDown,
}

/// `{"error": {...}}`: an error body clients can parse.
pub(super) fn is_openai_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_object))
}

pub(super) fn failure_of(e: &UpstreamError) -> Failure {
    match e {
        UpstreamError::Connect { .. } => Failure::Connect,
        UpstreamError::Timeout { .. } => Failure::Timeout,
        UpstreamError::Protocol { .. } | UpstreamError::Mismatch { .. } => Failure::Dropped,
        UpstreamError::Status { status, .. } => Failure::Status(*status),
    }
}

pub(super) fn connect_error(provider: &Provider) -> UpstreamError {
    UpstreamError::Connect {
        provider: provider.name.clone(),
    }
}

pub(super) fn timeout_error(provider: &Provider) -> UpstreamError {
    UpstreamError::Timeout {
        provider: provider.name.clone(),
    }
}

pub(super) fn protocol_error(provider: &Provider) -> UpstreamError {
    UpstreamError::Protocol {
        provider: provider.name.clone(),
    }
}

/// A reused connection that turned out to be closed while the request was being written:
/// safe to retry, the provider never received a whole request.
pub(super) fn is_stale_connection(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

pub(super) fn classify(provider: &Provider, e: &pingora::Error) -> UpstreamError {
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

pub(super) fn error_kind(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Connect { .. } => "connect",
        UpstreamError::Timeout { .. } => "timeout",
        UpstreamError::Protocol { .. } => "protocol",
        UpstreamError::Status { .. } => "status",
        UpstreamError::Mismatch { .. } => "mismatch",
    }
}

/// `data: {"error":{…}}` followed by a blank line: how a broken stream ends.
pub fn sse_error_event(error: &UpstreamError) -> Bytes {
    sse_event_of(&GatewayError::from(error.clone()))
}

/// `error` as an SSE `data:` event in OpenAI's error shape.
pub fn sse_event_of(error: &GatewayError) -> Bytes {
    let body = error.body();
    let mut event = Vec::with_capacity(body.len().saturating_add(8));
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}
