//! The client's side of one request, as the pipeline sees it: Pingora's [`ServerSession`]
//! (HTTP/1 or HTTP/2) with the two writes the pipeline uses shaped for it. A leaf: the
//! proxy, the jobs API and the connection guard all use it; it uses only Pingora.
//!
//! Lumen serves requests with its own frame ([`crate::proxy::Proxy`], an `HttpServerApp`)
//! rather than Pingora's generic `HttpProxy`: the pipeline always writes the answer itself,
//! so the proxy frame's per-request work (its session wrapper, cache state and module
//! contexts, three boxed hook futures, its upstream phases) bought nothing and cost CPU on
//! every request. This type keeps the calls the pipeline was written against.

use std::ops::{Deref, DerefMut};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;

/// One request's session with its client. Derefs to Pingora's [`ServerSession`] for
/// everything else (the request head, the body, keep-alive, timeouts, the stream).
pub struct Session {
    downstream: ServerSession,
}

impl Session {
    pub fn new(downstream: ServerSession) -> Session {
        Session { downstream }
    }

    /// An HTTP/1 session on `stream` (tests drive the pipeline's steps with one).
    pub fn new_h1(stream: Stream) -> Session {
        Session::new(ServerSession::new_http1(stream))
    }

    /// Writes the response head. `end_of_stream` says no body follows (a `HEAD` answer, an
    /// empty body); Pingora's session knows it from the head itself, so it is not passed on.
    pub async fn write_response_header(
        &mut self,
        head: Box<ResponseHeader>,
        _end_of_stream: bool,
    ) -> Result<()> {
        self.downstream.write_response_header(head).await
    }

    /// Writes body bytes; `end_of_stream` ends the body (with `None`, only ends it).
    pub async fn write_response_body(
        &mut self,
        body: Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        match body {
            None if !end_of_stream => Ok(()),
            body => {
                self.downstream
                    .write_response_body(body.unwrap_or_default(), end_of_stream)
                    .await
            }
        }
    }

    /// Pingora's session, to finish the request (and reuse the connection) with.
    pub fn into_inner(self) -> ServerSession {
        self.downstream
    }
}

impl Deref for Session {
    type Target = ServerSession;

    fn deref(&self) -> &ServerSession {
        &self.downstream
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut ServerSession {
        &mut self.downstream
    }
}
