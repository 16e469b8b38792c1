//! One small HTTP exchange with a provider outside the forwarding path (a health probe, a
//! sidecar's token count): a head with the provider's `Host` and extra headers, an optional
//! body, and an answer read up to a size limit, every read and write within `timeout`. The
//! connection goes back to the pool once the answer was read whole.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HOST;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;

use super::provider::Provider;

/// How long a connection used for an exchange may idle in the pool.
const IDLE: Duration = Duration::from_secs(30);

/// An answer's status and body.
pub struct Answer {
    pub status: u16,
    pub body: BytesMut,
}

/// Sends `head` (and `body`) to `provider` at `peer` and reads the answer, refusing one larger
/// than `max_body` bytes. Errors are short descriptions for logs and health details.
pub async fn exchange(
    connector: &Connector,
    provider: &Provider,
    peer: &HttpPeer,
    mut head: RequestHeader,
    body: Option<Bytes>,
    timeout: Duration,
    max_body: usize,
) -> Result<Answer, String> {
    let (mut session, _) = connector
        .get_http_session(peer)
        .await
        .map_err(|e| format!("connect: {}", e.etype().as_str()))?;
    session.set_read_timeout(Some(timeout));
    session.set_write_timeout(Some(timeout));
    let _ = head.insert_header(HOST, provider.host.clone());
    for (name, value) in &provider.headers {
        let _ = head.insert_header(name.clone(), value.clone());
    }
    let io = |e: pingora::BError| e.etype().as_str().to_string();
    session
        .write_request_header(Box::new(head))
        .await
        .map_err(io)?;
    if let Some(body) = body {
        session.write_request_body(body, true).await.map_err(io)?;
    }
    session.finish_request_body().await.map_err(io)?;
    session.read_response_header().await.map_err(io)?;
    let status = session
        .response_header()
        .map(|h| h.status.as_u16())
        .unwrap_or(0);
    let mut answer = BytesMut::new();
    while let Some(chunk) = session.read_response_body().await.map_err(io)? {
        if answer.len() + chunk.len() > max_body {
            return Err("answer too large".into());
        }
        answer.extend_from_slice(&chunk);
    }
    connector
        .release_http_session(session, peer, Some(IDLE))
        .await;
    Ok(Answer {
        status,
        body: answer,
    })
}
