//! Turning a provider's host name into a Pingora peer, off the request path's critical part.
//!
//! Config loading never does DNS (so `lumen check` works offline and a flaky resolver cannot
//! make a reload fail). An IP literal gets its peer at once. A host name is resolved with
//! tokio's resolver (on the blocking pool, never on a runtime thread) by the first request that
//! needs it; the answer is cached for `DNS_TTL`, after which the next request starts a refresh
//! and keeps using the old address until it lands, so only the very first request waits.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pingora::upstreams::peer::HttpPeer;

/// How long a resolved address is used before it is looked up again.
const DNS_TTL: Duration = Duration::from_secs(60);

/// Where a provider lives and how to talk to it.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Upstream {
    fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(self.idle_timeout);
        peer
    }
}

struct Resolved {
    peer: Arc<HttpPeer>,
    at: Instant,
}

/// A provider's current peer, resolved lazily and refreshed in the background.
pub struct Resolver {
    pub upstream: Upstream,
    current: Arc<ArcSwapOption<Resolved>>,
    refreshing: Arc<AtomicBool>,
    /// IP literals never need DNS.
    literal: bool,
}

impl Resolver {
    pub fn new(upstream: Upstream) -> Resolver {
        let literal_ip = upstream.host.parse::<IpAddr>().ok();
        let current = literal_ip.map(|ip| {
            Arc::new(Resolved {
                peer: Arc::new(upstream.peer(SocketAddr::new(ip, upstream.port))),
                at: Instant::now(),
            })
        });
        Resolver {
            literal: current.is_some(),
            current: Arc::new(ArcSwapOption::new(current)),
            refreshing: Arc::new(AtomicBool::new(false)),
            upstream,
        }
    }

    /// The peer to connect to. Only a never-resolved host name waits for DNS.
    pub async fn peer(&self) -> std::io::Result<Arc<HttpPeer>> {
        if let Some(resolved) = self.current.load_full() {
            if !self.literal && resolved.at.elapsed() > DNS_TTL {
                self.refresh_in_background();
            }
            return Ok(resolved.peer.clone());
        }
        let peer = Arc::new(self.upstream.peer(lookup(&self.upstream).await?));
        self.current.store(Some(Arc::new(Resolved {
            peer: peer.clone(),
            at: Instant::now(),
        })));
        Ok(peer)
    }

    fn refresh_in_background(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (upstream, current, refreshing) = (
            self.upstream.clone(),
            self.current.clone(),
            self.refreshing.clone(),
        );
        tokio::spawn(async move {
            match lookup(&upstream).await {
                Ok(addr) => current.store(Some(Arc::new(Resolved {
                    peer: Arc::new(upstream.peer(addr)),
                    at: Instant::now(),
                }))),
                // Keep the old address: a resolver hiccup must not take a provider away.
                Err(e) => {
                    tracing::warn!(host = %upstream.host, error = %e, "DNS refresh failed; keeping the previous address")
                }
            }
            refreshing.store(false, Ordering::Release);
        });
    }
}

async fn lookup(upstream: &Upstream) -> std::io::Result<SocketAddr> {
    let lookup = tokio::net::lookup_host((upstream.host.as_str(), upstream.port));
    let addrs: Vec<SocketAddr> = tokio::time::timeout(upstream.connect_timeout, lookup)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out"))??
        .collect();
    // Prefer IPv4: edge hosts often get AAAA answers without a working IPv6 route.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}
