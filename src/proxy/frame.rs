//! The HTTP service: what runs around the pipeline for each request on a client connection.
//! Pingora accepts the connection, speaks HTTP/1 or HTTP/2 on it and hands each request to
//! [`Proxy::process_new_http`], which reads the head, runs the gateway's phases and gives the
//! connection back for its next request.
//!
//! Lumen writes every answer itself, so it does not run under Pingora's `HttpProxy`: that
//! frame's per-request work (a boxed session wrapper with cache state and module contexts, a
//! boxed future per hook, its upstream phases) was a cost on every request and bought
//! nothing here. What it did that matters is kept: a malformed head is answered 400, `CONNECT`
//! is refused (by [`Gateway::serve`], in OpenAI's shape), and keep-alive connections waiting
//! for a request are let go at shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use tokio::sync::Notify;

use super::ctx::RequestCtx;
use super::gateway::Gateway;
use crate::session::Session;

/// The gateway as a Pingora HTTP service (one per thread in `runtime: per_core`).
pub struct Proxy {
    gateway: Gateway,
    options: HttpServerOptions,
    /// Set when the service shuts down; `closed` wakes the connections waiting for a request.
    closing: AtomicBool,
    closed: Notify,
}

impl Proxy {
    pub fn new(gateway: Gateway, options: HttpServerOptions) -> Proxy {
        Proxy {
            gateway,
            options,
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    /// The gateway this service runs.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Resolves once the service is shutting down.
    async fn shutting_down(&self) {
        let notified = self.closed.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a shutdown between the two still wakes us.
        notified.as_mut().enable();
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        notified.await
    }

    /// Reads the request head. `None`: there is no request to serve (the client closed, sent
    /// a malformed head, which is answered 400 here, or the service is shutting down and this
    /// is a keep-alive connection waiting for its next request).
    async fn read_head(&self, s: &mut Session) -> Option<()> {
        let read = if crate::conn::first_request(s) {
            // A new connection's first request is read even while shutting down (see
            // `first_request`); the header timeout bounds the wait.
            s.read_request().await
        } else {
            tokio::select! {
                // Polled first: a head already buffered is served even while shutting down.
                biased;
                read = s.read_request() => read,
                () = self.shutting_down() => return None,
            }
        };
        match read {
            Ok(true) => Some(()),
            Ok(false) => None,
            Err(e) => {
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    tracing::debug!(error = %e, "malformed request head");
                    let _ = malformed_head(s).await;
                }
                s.shutdown().await;
                None
            }
        }
    }
}

#[async_trait]
impl HttpServerApp for Proxy {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let mut s = Session::new(session);
        self.read_head(&mut s).await?;
        if *shutdown.borrow() {
            // Answer this one, then close: the process is on its way out.
            s.set_keepalive(None);
        }
        let mut ctx = RequestCtx::new();
        let served = self.gateway.serve(&mut s, &mut ctx).await;
        if let Err(e) = &served {
            tracing::debug!(error = %e, "request failed");
            self.gateway.fail(&mut s, e, &mut ctx).await;
        }
        self.gateway.finish(&s, &mut ctx).await;
        if served.is_err() {
            // Whatever state the connection is in, it is not reused.
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&s);
        let reusable = s.into_inner().finish().await.ok().flatten()?;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    async fn http_cleanup(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
    }
}

/// A request head Pingora could not parse: answered 400 in OpenAI's shape, and the connection
/// closed (where the next request would start is unknown). Nothing of the head is known, so
/// this is written here rather than by the pipeline.
async fn malformed_head(s: &mut Session) -> Result<()> {
    const BODY: &[u8] = br#"{"error":{"message":"malformed HTTP request head","type":"invalid_request_error","param":null,"code":"malformed_request"}}"#;
    let mut head = ResponseHeader::build_no_case(StatusCode::BAD_REQUEST, Some(3))?;
    head.insert_header(CONTENT_TYPE, "application/json")?;
    head.insert_header(CONTENT_LENGTH, BODY.len())?;
    s.set_keepalive(None);
    s.write_response_header(Box::new(head), false).await?;
    s.write_response_body(Some(Bytes::from_static(BODY)), true)
        .await
}
