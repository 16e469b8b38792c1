//! Connections spread evenly over the threads of `server.runtime: per_core`.
//!
//! Each per-core thread runs its own runtime, and a connection stays on the thread that
//! accepted it. The threads wait on one listening socket, and whichever wakes first takes what
//! is queued: a client that opens its connections at once (a load balancer, a pool warming up,
//! a load generator) can land all of them on one thread while the others idle. Measured on two
//! cores with 32 connections opened together: in two runs of six every connection was on one
//! thread, and requests/s fell by a fifth (the other thread idle, the first saturated).
//!
//! So a thread that accepts a connection while it serves [`SLACK`] more than the least busy
//! thread hands the connection over, before anything is read from it: the socket leaves this
//! thread's runtime and is registered with the other's. This costs a few system calls once per
//! connection, never per request, and only while the threads are uneven (a moved connection's
//! writes are buffered by its guard, as Pingora's stream buffers an accepted one's). nginx evens its
//! workers out the same way in spirit (a worker with most of its connections in use stops
//! accepting); `SO_REUSEPORT` per thread would spread by a hash of the peer's address, which
//! is uneven for few connections and cannot move one, and would need one socket per thread in
//! the listener table that a graceful upgrade hands over.
//!
//! Only plain TCP connections move: a TLS connection has already shaken hands on its thread
//! (its state lives in the stream), and the jobs socket's connections are the node's own.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service as ServiceTrait;
use prometheus::{IntGauge, IntGaugeVec};
use tokio::runtime::Handle;

/// How many more connections a thread may serve than the least busy one before it hands a
/// new one over. One would move a connection back and forth between two threads that take
/// turns accepting; two keeps them within two of each other.
pub const SLACK: i64 = 2;

/// The per-core threads' connection counts, and their runtimes once they run.
#[derive(Debug)]
pub struct Spread {
    cores: Box<[Core]>,
}

#[derive(Debug)]
struct Core {
    /// Connections this thread serves (counted by [`Counted`]): `lumen_connections_open`.
    open: IntGauge,
    /// The thread's runtime, set when its service starts.
    runtime: OnceLock<Handle>,
}

/// Where a newly accepted connection is served.
#[derive(Debug)]
pub enum Place {
    /// On the thread that accepted it.
    Here(Counted),
    /// On core `.0`, to which it should be handed.
    There(usize),
}

impl Spread {
    /// `cores` threads, whose counts are `gauge`'s series `thread="1"`, `"2"`, ….
    pub fn new(cores: usize, gauge: &IntGaugeVec) -> Spread {
        Spread {
            cores: (1..=cores.max(1))
                .map(|thread| Core {
                    open: gauge.with_label_values(&[&thread.to_string()]),
                    runtime: OnceLock::new(),
                })
                .collect(),
        }
    }

    /// Core `core`'s service has started on `runtime`: connections may be handed to it.
    pub fn started(&self, core: usize, runtime: Handle) {
        if let Some(c) = self.cores.get(core) {
            let _ = c.runtime.set(runtime);
        }
    }

    /// Where a connection core `me` just accepted is served: here, unless `me` serves more
    /// than [`SLACK`] connections beyond a started core that serves the fewest.
    pub fn place(self: &Arc<Self>, me: usize) -> Place {
        let mine = self.open(me);
        let least = self
            .cores
            .iter()
            .enumerate()
            .filter(|(i, c)| *i != me && c.runtime.get().is_some())
            .min_by_key(|(_, c)| c.open.get());
        match least {
            Some((i, c)) if mine >= c.open.get().saturating_add(SLACK) => Place::There(i),
            _ => Place::Here(self.count(me)),
        }
    }

    /// One more connection on `core`, until the returned count is dropped.
    pub fn count(self: &Arc<Self>, core: usize) -> Counted {
        if let Some(c) = self.cores.get(core) {
            c.open.inc();
        }
        Counted {
            spread: self.clone(),
            core,
        }
    }

    /// The runtime of `core`, once its service runs.
    pub fn runtime(&self, core: usize) -> Option<&Handle> {
        self.cores.get(core).and_then(|c| c.runtime.get())
    }

    /// Connections `core` serves now.
    pub fn open(&self, core: usize) -> i64 {
        self.cores.get(core).map_or(0, |c| c.open.get())
    }
}

/// One connection counted on a core; the count drops when this does (with the connection).
#[derive(Debug)]
pub struct Counted {
    spread: Arc<Spread>,
    core: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(c) = self.spread.cores.get(self.core) {
            c.open.dec();
        }
    }
}

/// A plain TCP connection taken off the runtime that accepted it, on its way to another.
#[derive(Debug)]
pub struct Detached {
    socket: OwnedFd,
    peer: Option<SocketAddr>,
}

/// Takes `stream` off this thread's runtime, when it is a plain TCP connection from which
/// nothing was read; anything else comes back as it was.
pub fn detach(stream: Stream) -> Result<Detached, Stream> {
    let Some(tcp) = stream.as_any().downcast_ref::<TcpStream>() else {
        return Err(stream);
    };
    let peer = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().cloned());
    if !matches!(peer, Some(SocketAddr::Inet(_))) {
        return Err(stream);
    }
    // SAFETY: the descriptor is the stream's own and open while `tcp` is borrowed; it is only
    // duplicated here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let Ok(socket) = borrowed.try_clone_to_owned() else {
        return Err(stream);
    };
    // The stream's own descriptor goes with it: deregistered from this runtime's poller, then
    // closed. The duplicate keeps the connection open.
    drop(stream);
    Ok(Detached { socket, peer })
}

impl Detached {
    /// The connection as a stream of the runtime this runs on (a task of the thread it was
    /// handed to). `None`: it could not be registered, and is closed.
    pub fn attach(self) -> Option<Stream> {
        let tcp = tokio::net::TcpStream::from_std(std::net::TcpStream::from(self.socket)).ok()?;
        let mut stream = TcpStream::from(tcp);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        let _ = digest.peer_addr.set(self.peer);
        stream.set_socket_digest(digest);
        Some(Box::new(stream))
    }
}

/// A per-core proxy service: Pingora's listening service, which tells [`Spread`] its runtime
/// when it starts (the one place code runs on that runtime before any connection).
pub struct CoreService<S> {
    pub service: S,
    spread: Arc<Spread>,
    core: usize,
}

impl<S> CoreService<S> {
    pub fn new(service: S, spread: Arc<Spread>, core: usize) -> CoreService<S> {
        CoreService {
            service,
            spread,
            core,
        }
    }
}

#[async_trait]
impl<S: ServiceTrait> ServiceTrait for CoreService<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        self.spread.started(self.core, Handle::current());
        self.service
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.service.name()
    }

    fn threads(&self) -> Option<usize> {
        self.service.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        // A graceful upgrade closes the inherited sockets no service claims: without this,
        // one listener left out of a new config would stay open, queueing connections.
        self.service.listen_addresses()
    }

    fn on_startup_delay(&self, time_waited: std::time::Duration) {
        self.service.on_startup_delay(time_waited)
    }

    fn runtime_opts_override(
        &self,
        global: &pingora::server::RuntimeOpts,
    ) -> Option<pingora::server::RuntimeOpts> {
        self.service.runtime_opts_override(global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> IntGaugeVec {
        IntGaugeVec::new(prometheus::Opts::new("open", "open"), &["thread"]).expect("gauge")
    }

    fn started(cores: usize) -> (Arc<Spread>, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let spread = Arc::new(Spread::new(cores, &gauge()));
        for core in 0..cores {
            spread.started(core, runtime.handle().clone());
        }
        (spread, runtime)
    }

    #[test]
    fn a_burst_on_one_thread_is_spread_within_the_slack() {
        let (spread, _rt) = started(2);
        let mut held = Vec::new();
        // Every connection is accepted by core 0, as in a burst that thread won.
        for _ in 0..32 {
            match spread.place(0) {
                Place::Here(c) => held.push(c),
                Place::There(to) => held.push(spread.count(to)),
            }
        }
        let (a, b) = (spread.open(0), spread.open(1));
        assert_eq!(a + b, 32);
        assert!((a - b).abs() <= SLACK, "{a} vs {b}");
        // Counts go with the connections.
        held.truncate(10);
        assert_eq!(spread.open(0) + spread.open(1), 10);
        drop(held);
        assert_eq!((spread.open(0), spread.open(1)), (0, 0));
    }

    #[test]
    fn a_core_not_started_yet_is_never_handed_a_connection() {
        let spread = Arc::new(Spread::new(2, &gauge()));
        let held: Vec<Counted> = (0..8)
            .map(|_| match spread.place(0) {
                Place::Here(c) => c,
                Place::There(to) => panic!("handed to {to}, which has no runtime"),
            })
            .collect();
        assert_eq!(spread.open(0), held.len() as i64);
    }

    #[test]
    fn one_core_keeps_everything() {
        let (spread, _rt) = started(1);
        for _ in 0..4 {
            assert!(matches!(spread.place(0), Place::Here(_)));
        }
    }
}
