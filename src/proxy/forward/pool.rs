//! Connections to providers: new ones through Pingora's `Connector` (TCP, TLS, its options),
//! idle keep-alive ones in a pool of our own. Pingora's pool costs, on every request, a task
//! spawned to watch the idle connection, a oneshot, an async mutex, a shared map, an LRU and a
//! `getpeername` syscall (a profile put it at 3.7% of the gateway's CPU at c=32). Here an
//! idle connection is a stream in a list under a mutex that only this forwarder's thread takes
//! (`runtime: per_core` gives each thread its own forwarder), checked when it is taken: a
//! connection the provider closed, or one it sent unasked-for bytes on, is dropped then.
//! Connections past their idle timeout are closed by a sweep over every provider's list, at
//! most once a second, when a connection is given back (so a provider no longer used does not
//! keep its idle connections open beyond their timeout while the gateway has traffic).

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::AsyncReadExt;

use super::answer::Answer;
use super::ready::ready_now;

/// New connections, and the idle ones kept for reuse.
pub struct Connections {
    connector: Connector,
    idle: Mutex<Idle>,
    /// Most idle connections kept, all providers together.
    max_idle: usize,
}

/// How often idle connections past their timeout are looked for across all providers.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Idle {
    /// Per peer (`Peer::reuse_hash`: address, TLS name and options), oldest first.
    by_peer: HashMap<u64, Vec<Kept>>,
    total: usize,
    /// When the next sweep is due (`None`: at the next release).
    next_sweep: Option<Instant>,
}

impl Idle {
    /// Closes every connection past its idle timeout, and forgets peers with none left.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|due| now < due) {
            return;
        }
        self.next_sweep = now.checked_add(SWEEP_EVERY);
        self.by_peer.retain(|_, list| {
            list.retain(|k| k.until > now);
            !list.is_empty()
        });
        self.total = self.by_peer.values().map(Vec::len).sum();
    }
}

struct Kept {
    stream: Stream,
    /// Dropped instead of reused from this time on.
    until: Instant,
}

impl Connections {
    pub fn new(max_idle: usize) -> Connections {
        Connections {
            // Pingora's pool is never given a connection back: it only makes new ones.
            connector: Connector::new(Some(ConnectorOptions::new(0))),
            idle: Mutex::new(Idle::default()),
            max_idle,
        }
    }

    /// A connection to `peer`, as its stream (`request.rs` writes on it, `answer.rs` reads the
    /// answer): the most recently used idle one that is still sound, else a new one. `true`
    /// with a reused connection (a request written on it may find it closed).
    pub async fn get(&self, peer: &HttpPeer) -> pingora::Result<(Stream, bool)> {
        let key = peer.reuse_hash();
        while let Some(mut stream) = self.take(key) {
            if sound(&mut stream) {
                return Ok((stream, true));
            }
        }
        // Boxed: the connect future (a TLS handshake included) is about 9 KiB, and inline it
        // would make every future that awaits this one that much larger, each moved whole
        // once per request.
        let (session, reused) = Box::pin(self.connector.get_http_session(peer)).await?;
        match session {
            HttpSession::H1(h1) => Ok((h1.into_inner(), reused)),
            // Providers are reached over HTTP/1.1 only (no ALPN `h2` is offered).
            HttpSession::H2(_) | HttpSession::Custom(_) => pingora::Error::e_explain(
                pingora::ErrorType::InvalidHTTPHeader,
                "a provider connection that is not HTTP/1.1",
            ),
        }
    }

    /// Gives a connection whose exchange ended back for reuse, when its answer was read whole
    /// and neither side asked to close it; else it is closed.
    pub fn release(&self, answer: Answer, peer: &HttpPeer, idle_timeout: Duration) {
        let Some(mut stream) = answer.into_reusable() else {
            return;
        };
        if !sound(&mut stream) {
            return;
        }
        let now = Instant::now();
        let Some(until) = now.checked_add(idle_timeout) else {
            return;
        };
        let mut idle = self.lock();
        let idle = &mut *idle;
        idle.sweep(now);
        let list = idle.by_peer.entry(peer.reuse_hash()).or_default();
        if idle.total >= self.max_idle {
            // Full: the oldest connection of this peer makes room, else this one is closed.
            if list.is_empty() {
                return;
            }
            list.remove(0);
            idle.total = idle.total.saturating_sub(1);
        }
        list.push(Kept { stream, until });
        idle.total = idle.total.saturating_add(1);
    }

    /// The newest idle connection to `key` not past its idle timeout (older ones of the same
    /// peer expire first: when the newest has, all have).
    fn take(&self, key: u64) -> Option<Stream> {
        let mut idle = self.lock();
        let idle = &mut *idle;
        let list = idle.by_peer.get_mut(&key)?;
        let kept = list.pop()?;
        idle.total = idle.total.saturating_sub(1);
        if kept.until > Instant::now() {
            return Some(kept.stream);
        }
        idle.total = idle.total.saturating_sub(list.len());
        list.clear();
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        // A panic while holding the lock leaves a consistent map (every change is one step).
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle connections kept now (tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().total
    }
}

/// Whether an idle connection can carry a request: nothing to read on it (no close, no error,
/// no bytes the provider sent unasked). Tokio remembers that a socket had nothing to read, so
/// this makes no syscall unless something arrived.
fn sound(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    ready_now(stream.read(&mut byte)).is_none()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A new connection to a peer on a local listener, with the server's side of it.
    async fn pair(
        listener: &tokio::net::TcpListener,
        peer: &HttpPeer,
        pool: &Connections,
    ) -> (Stream, tokio::net::TcpStream) {
        let (conn, reused) = pool.get(peer).await.unwrap();
        assert!(!reused);
        let (server, _) = listener.accept().await.unwrap();
        (conn, server)
    }

    /// One request on `conn`, answered by `server` with `answer`; the head is read.
    async fn ask(mut stream: Stream, server: &mut tokio::net::TcpStream, answer: &[u8]) -> Answer {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        stream.flush().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = server.read(&mut buf).await.unwrap();
        server.write_all(answer).await.unwrap();
        let mut upstream = Answer::new(stream, Duration::from_secs(5));
        let _head = upstream.read_head().await.unwrap();
        upstream
    }

    /// One request answered whole.
    async fn answered(conn: Stream, server: &mut tokio::net::TcpStream) -> Answer {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let mut upstream = ask(conn, server, answer).await;
        while upstream.read_body().await.unwrap().is_some() {}
        upstream
    }

    #[tokio::test]
    async fn a_released_connection_is_reused_and_a_closed_or_expired_one_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = HttpPeer::new(listener.local_addr().unwrap(), false, String::new());
        let pool = Connections::new(8);

        // Reused.
        let (session, mut server) = pair(&listener, &peer, &pool).await;
        let session = answered(session, &mut server).await;
        pool.release(session, &peer, Duration::from_secs(60));
        assert_eq!(pool.idle_count(), 1);
        let (conn, reused) = pool.get(&peer).await.unwrap();
        assert!(reused);
        assert_eq!(pool.idle_count(), 0);

        // Closed by the provider while idle: dropped when taken, and a new one made.
        let session = answered(conn, &mut server).await;
        pool.release(session, &peer, Duration::from_secs(60));
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (session, mut server) = pair(&listener, &peer, &pool).await;

        // Past its idle timeout: never reused.
        let session = answered(session, &mut server).await;
        pool.release(session, &peer, Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (session, mut server) = pair(&listener, &peer, &pool).await;

        // An answer not read whole is never given back.
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok";
        let session = ask(session, &mut server, answer).await;
        pool.release(session, &peer, Duration::from_secs(60));
        assert_eq!(pool.idle_count(), 0);
    }

    /// A provider no longer used does not keep its idle connections past their timeout: the
    /// next connection given back (to any provider) after the sweep interval closes them.
    #[tokio::test]
    async fn idle_connections_of_an_unused_provider_are_closed_after_their_timeout() {
        let (a, b) = (
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let peer_a = HttpPeer::new(a.local_addr().unwrap(), false, String::new());
        let peer_b = HttpPeer::new(b.local_addr().unwrap(), false, String::new());
        let pool = Connections::new(8);
        let (session, mut server_a) = pair(&a, &peer_a, &pool).await;
        let session = answered(session, &mut server_a).await;
        pool.release(session, &peer_a, Duration::from_millis(1));
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(100)).await;
        let (session, mut server_b) = pair(&b, &peer_b, &pool).await;
        let session = answered(session, &mut server_b).await;
        pool.release(session, &peer_b, Duration::from_secs(60));
        assert_eq!(pool.idle_count(), 1, "only provider b's connection is kept");
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), server_a.read(&mut buf)).await;
        assert_eq!(
            read.unwrap().unwrap(),
            0,
            "provider a's connection was closed"
        );
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_its_size() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = HttpPeer::new(listener.local_addr().unwrap(), false, String::new());
        let pool = Connections::new(2);
        let mut servers = Vec::new();
        let mut sessions = Vec::new();
        for _ in 0..3 {
            let (session, server) = pair(&listener, &peer, &pool).await;
            sessions.push(session);
            servers.push(server);
        }
        for (session, server) in sessions.into_iter().zip(servers.iter_mut()) {
            let session = answered(session, server).await;
            pool.release(session, &peer, Duration::from_secs(60));
        }
        assert_eq!(pool.idle_count(), 2);
    }
}
