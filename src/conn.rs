//! Client connections: the limits every listener enforces around Pingora's HTTP code.
//!
//! Pingora 0.9 bounds each *read* of a request head (60 s), not the head as a whole, and once
//! a keep-alive request has been answered it waits for the next one with no timeout at all. A
//! client sending one header byte every few seconds, or opening connections and never using
//! them, therefore holds a task, a socket and its buffers forever. [`Guarded`] wraps a
//! listening service's app and puts each accepted connection in a [`GuardedStream`], which
//! enforces four limits:
//!
//! - `server.header_timeout`: a request head must be complete this long after the connection
//!   opened, or after the first byte of a keep-alive request arrived;
//! - `server.max_header_bytes`: a request head (request line, header fields, blank line) may
//!   be at most this long, with at most [`MAX_HEADER_FIELDS`] fields. Pingora's own limits
//!   are 1 MiB and 256 fields, refused with a plain-text 400; here a longer head is answered
//!   `431 Request Header Fields Too Large` in OpenAI's error shape as soon as it passes the
//!   limit, written straight on the socket (Pingora has parsed nothing yet), and the
//!   connection is closed;
//! - `server.keepalive_timeout`: an idle keep-alive connection (HTTP/1 between requests, HTTP/2
//!   through Pingora's `h2_idle_timeout`) is closed after this long;
//! - `server.max_connections`: connections beyond this many open ones are closed at once.
//!
//! `server.body_timeout` is carried here with the others but enforced by the pipeline's body
//! read, which knows where a body ends.
//!
//! Only reads are put on the clock, and only while a head is awaited: the phase is switched by
//! [`request_started`] (head parsed: the body has Pingora's per-read timeout, the response our
//! write timeout) and [`request_finished`] (answered: idle until the next head), which the
//! proxy and the admin app call through the session's stream. HTTP/2 connections (ALPN `h2`,
//! or the h2c preface) have their own framing and idle timeout, so they are only counted.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::spread::{self, Counted, Place, Spread};

/// What the HTTP/2 client connection preface starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Most header fields in one request head: Pingora parses at most 256 (`MAX_HEADERS` in
/// pingora-core) and answers more with a plain-text 400, so we refuse them first, in our shape.
pub const MAX_HEADER_FIELDS: usize = 256;

/// How long a refused connection (431) may take to receive its answer: the answer is written,
/// the sending side closed, and what the client still sends is read and discarded meanwhile,
/// so that closing does not reset the connection before the client has read the 431.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// The limits of one listening service (`server:` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    /// Longest request head in bytes (`server.max_header_bytes`); a longer one is answered 431.
    pub max_header_bytes: usize,
    /// How long a request body may take to arrive once its head is in (`server.body_timeout`;
    /// enforced by the pipeline's body read, answered 408).
    pub body_timeout: Duration,
}

/// A listening service's app behind the connection limits. Wrap the whole app, so every
/// endpoint of the service (TCP, TLS, Unix socket) shares one connection count.
pub struct Guarded<A> {
    app: Arc<A>,
    limits: ConnLimits,
    /// One permit per open connection; the permit lives in the connection's stream.
    slots: Arc<Semaphore>,
    /// When a refusal was last logged (seconds since the Unix epoch): one line a second at most,
    /// since refusals come in floods.
    last_warned: AtomicU64,
    /// `runtime: per_core`: this thread among its siblings, which connections are spread over.
    cores: Option<Cores<A>>,
}

/// The per-core services' apps (one each, by core), and which one is this service's.
struct Cores<A> {
    apps: Arc<[Arc<A>]>,
    spread: Arc<Spread>,
    me: usize,
}

impl<A> Guarded<A> {
    pub fn new(app: A, limits: ConnLimits) -> Self {
        Guarded {
            app: Arc::new(app),
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            last_warned: AtomicU64::new(0),
            cores: None,
        }
    }

    /// The per-thread services of `runtime: per_core`, one per app: one listening service to
    /// `server.max_connections`, whose connections are spread evenly over the threads
    /// ([`crate::spread`]).
    pub fn per_core(apps: Vec<A>, limits: ConnLimits, spread: &Arc<Spread>) -> Vec<Self> {
        let apps: Arc<[Arc<A>]> = apps.into_iter().map(Arc::new).collect();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        (0..apps.len())
            .map(|me| Guarded {
                app: apps[me].clone(),
                limits,
                slots: slots.clone(),
                last_warned: AtomicU64::new(0),
                cores: Some(Cores {
                    apps: apps.clone(),
                    spread: spread.clone(),
                    me,
                }),
            })
            .collect()
    }

    fn warn_refused(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                max_connections = self.limits.max_connections,
                "connection refused: server.max_connections are open"
            );
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A stream handed back for reuse is already guarded and holds its slot.
        if stream.as_any().is::<GuardedStream>() {
            return self.app.process_new(stream, shutdown).await;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            // Dropping the stream closes it: cheaper than reading a request to answer 503, and
            // the point is to stop spending memory on this client.
            self.warn_refused();
            return None;
        };
        let Some(cores) = &self.cores else {
            return self.serve_here(stream, slot, None, shutdown).await;
        };
        // `runtime: per_core`: a thread ahead of its siblings hands the connection over.
        let (stream, slot, counted) = match cores.spread.place(cores.me) {
            Place::Here(counted) => (stream, slot, counted),
            Place::There(to) => match self.hand_over(cores, to, stream, slot, shutdown) {
                Ok(()) => return None,
                Err((stream, slot)) => (stream, slot, cores.spread.count(cores.me)),
            },
        };
        self.serve_here(stream, slot, Some(counted), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

impl<A: ServerApp + Send + Sync + 'static> Guarded<A> {
    /// A new connection served on this thread.
    async fn serve_here(
        &self,
        stream: Stream,
        slot: OwnedSemaphorePermit,
        counted: Option<Counted>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream = GuardedStream::new(stream, self.limits, slot, counted);
        self.app.process_new(Box::new(stream), shutdown).await
    }

    /// Hands a new connection to core `to`, where it is served to its end (Pingora's loop
    /// over the connection's requests, run there). What cannot move (TLS, a Unix socket, a
    /// core without a runtime yet) comes back, to be served here.
    fn hand_over(
        &self,
        cores: &Cores<A>,
        to: usize,
        stream: Stream,
        slot: OwnedSemaphorePermit,
        shutdown: &ShutdownWatch,
    ) -> Result<(), (Stream, OwnedSemaphorePermit)> {
        let (Some(runtime), Some(app)) = (cores.spread.runtime(to), cores.apps.get(to)) else {
            return Err((stream, slot));
        };
        if *shutdown.borrow() {
            // Shutting down: the other thread may already have let its idle connections go,
            // and the drain must see this one; it is served where it is.
            return Err((stream, slot));
        }
        let socket = match spread::detach(stream) {
            Ok(socket) => socket,
            Err(stream) => return Err((stream, slot)),
        };
        let counted = cores.spread.count(to);
        let (app, limits, shutdown) = (app.clone(), self.limits, shutdown.clone());
        runtime.spawn(async move {
            // Closed when it cannot be registered there (its descriptor dropped).
            let Some(stream) = socket.attach() else {
                return;
            };
            let stream: Stream =
                Box::new(GuardedStream::new(stream, limits, slot, Some(counted)).moved());
            let mut next = app.process_new(stream, &shutdown).await;
            while let Some(stream) = next {
                next = app.process_new(stream, &shutdown).await;
            }
        });
        Ok(())
    }
}

/// Marks the request on `session` as having its head read: from here on its reads are not
/// on the head clock. A no-op on streams that are not guarded (HTTP/2, the jobs' subrequests).
///
/// Call it once the request is counted in flight: a draining process that sees no unserved
/// connection then sees the request (see [`unserved_connections`]).
pub fn request_started(session: &ServerSession) {
    if let Some(stream) = guarded(session) {
        stream.served();
        stream.set_phase(Phase::Busy);
    }
}

/// Marks the request on `session` as answered: the connection idles until the next request
/// starts, at most `keepalive_timeout`.
pub fn request_finished(session: &ServerSession) {
    if let Some(stream) = guarded(session) {
        stream.served();
        let until = Instant::now() + stream.limits.keepalive_timeout;
        stream.set_phase(Phase::Idle { until });
    }
}

/// Whether `session` is the first request of its connection, still to be read. Shutdown lets
/// go of keep-alive connections waiting for their next request, but not of these: their
/// client connected to send a request, perhaps in the very moment the listener stopped (or
/// was handed to a new process), and closing the connection unread would fail that request
/// with no answer to retry on. `server.header_timeout` bounds the wait. `false` for streams
/// that are not guarded (HTTP/2 streams arrive with their head; the jobs' subrequests).
pub fn first_request(session: &ServerSession) -> bool {
    guarded(session).is_some_and(|stream| stream.unserved.load(Ordering::Acquire))
}

fn guarded(session: &ServerSession) -> Option<&GuardedStream> {
    session.stream()?.as_any().downcast_ref::<GuardedStream>()
}

/// Where a connection is between requests, and so what its reads must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request head is being read: it must be complete by `deadline`.
    Head { deadline: Instant },
    /// Between requests: the next one must start by `until`; its first byte starts the head clock.
    Idle { until: Instant },
    /// A request is being served: body reads have Pingora's own read timeout.
    Busy,
    /// HTTP/2: idle connections are closed by Pingora's `h2_idle_timeout`.
    Exempt,
}

/// An accepted connection with its slot and its head and idle deadlines.
pub struct GuardedStream {
    inner: Stream,
    limits: ConnLimits,
    /// Written by the request hooks through `&self` (std Mutex: held for one assignment, never
    /// across an await); read by `poll_read` through `&mut self`, without locking.
    phase: Mutex<Phase>,
    /// Whether nothing has been read yet (the h2c preface is looked for in the first read).
    fresh: bool,
    /// Whether no request has started on this HTTP/1 connection yet: counted in [`UNSERVED`]
    /// until one has, or the connection ends.
    unserved: AtomicBool,
    /// The head being read: its size so far, and whether it has ended.
    head: HeadScan,
    /// Set once the head is refused: the 431 being written, then the close.
    refusal: Option<Refusal>,
    timer: Pin<Box<Sleep>>,
    /// Released when the connection is dropped.
    _slot: OwnedSemaphorePermit,
    /// `runtime: per_core`: the connection counted on its thread, until it is dropped.
    _core: Option<Counted>,
    /// A connection handed over from another thread: Pingora's stream around it has no write
    /// buffer (Pingora sizes it only as it accepts), so writes are gathered here as Pingora's
    /// own buffer would, and a response's head and body go out in one send.
    out: Option<WriteBuf>,
}

/// Writes held until they fill Pingora's write buffer size or are flushed (tokio's
/// `BufWriter`'s rule).
#[derive(Debug, Default)]
struct WriteBuf {
    held: Vec<u8>,
    /// How much of `held` is already written.
    sent: usize,
}

/// Counts a request head's bytes and fields as they arrive, up to the blank line that ends it,
/// whatever the reads' boundaries (a line end split across two reads counts once).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct HeadScan {
    /// Bytes of this head so far, the ending blank line included once seen.
    bytes: usize,
    /// Lines ended so far: the request line, then one per header field.
    lines: usize,
    /// Line feeds since the last byte that was neither CR nor LF: two end the head (CRLFCRLF,
    /// or bare LFs, which httparse accepts too).
    newlines: u8,
    /// Whether a byte other than CR or LF has arrived: blank lines before the request line are
    /// skipped by the parser (RFC 9112 §2.2), so they must not end the head here.
    started: bool,
    /// The blank line was seen: what follows is the body, or the next pipelined request (which
    /// Pingora parses from what it has already read; its next read starts a new count).
    complete: bool,
}

/// Why a head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadTooLarge {
    Bytes(usize),
    Fields,
}

impl HeadScan {
    /// Takes the next bytes read; `Err` once the head is over `max_bytes` or has too many fields.
    fn feed(&mut self, bytes: &[u8], max_bytes: usize) -> Result<(), HeadTooLarge> {
        if self.complete {
            return Ok(());
        }
        let mut taken = bytes.len();
        // Line by line (memchr finds each line feed): within a line only whether it holds a
        // byte other than CR matters, and a header line's first byte tells.
        let mut rest = bytes;
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest);
            let (line, after) = match end {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            if line.iter().any(|&b| b != b'\r') {
                self.started = true;
                self.newlines = 0;
            }
            if end.is_none() {
                break;
            }
            if self.started {
                self.newlines = self.newlines.saturating_add(1);
                if self.newlines == 2 {
                    self.complete = true;
                    taken = bytes.len() - after.len();
                    break;
                }
                self.lines = self.lines.saturating_add(1);
            }
            rest = after;
        }
        self.bytes = self.bytes.saturating_add(taken);
        if self.bytes > max_bytes {
            Err(HeadTooLarge::Bytes(max_bytes))
        } else if self.lines.saturating_sub(1) > MAX_HEADER_FIELDS {
            Err(HeadTooLarge::Fields)
        } else {
            Ok(())
        }
    }
}

/// A refused head's answer on its way out, then the wait for the client to stop sending.
#[derive(Debug)]
struct Refusal {
    response: Vec<u8>,
    written: usize,
    /// The answer is written and the sending side shut: reads are only discarded now.
    sent: bool,
    /// The connection closes at this instant at the latest.
    until: Instant,
    why: HeadTooLarge,
}

impl Refusal {
    fn new(why: HeadTooLarge) -> Self {
        let message = match why {
            HeadTooLarge::Bytes(limit) => format!(
                "the request head (request line and headers) is larger than the gateway's limit of {limit} bytes"
            ),
            HeadTooLarge::Fields => format!(
                "the request has more than the gateway's limit of {MAX_HEADER_FIELDS} header fields"
            ),
        };
        let body = serde_json::json!({"error": {
            "message": message,
            "type": "invalid_request_error",
            "param": null,
            "code": "request_header_fields_too_large",
        }})
        .to_string();
        let mut response = format!(
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body.as_bytes());
        Refusal {
            response,
            written: 0,
            sent: false,
            until: Instant::now() + REFUSAL_LINGER,
            why,
        }
    }

    /// What the read that Pingora is waiting on finally fails with.
    fn error(&self) -> io::Error {
        let what = match self.why {
            HeadTooLarge::Bytes(_) => {
                "request head larger than server.max_header_bytes (answered 431)"
            }
            HeadTooLarge::Fields => "request head with too many header fields (answered 431)",
        };
        io::Error::new(io::ErrorKind::InvalidData, what)
    }
}

/// HTTP/1 connections accepted whose first request has not started: a draining process waits
/// for them too (see `drain`), or a connection accepted just before the listener stopped or
/// was handed over would be closed unanswered when the process exits. A connection leaves the
/// count only after its request is counted in flight ([`request_started`]), so the drain,
/// reading this count before the in-flight gauge, never sees the request in neither.
static UNSERVED: AtomicUsize = AtomicUsize::new(0);

/// How many accepted HTTP/1 connections have not started their first request yet.
pub fn unserved_connections() -> usize {
    UNSERVED.load(Ordering::Acquire)
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.served();
    }
}

impl GuardedStream {
    fn new(
        inner: Stream,
        limits: ConnLimits,
        slot: OwnedSemaphorePermit,
        core: Option<Counted>,
    ) -> Self {
        let deadline = Instant::now() + limits.header_timeout;
        // HTTP/2 connections are not counted unserved: Pingora's own shutdown (GOAWAY) lets
        // their requests finish, and each is counted in flight as it starts.
        let h2 = matches!(inner.selected_alpn_proto(), Some(ALPN::H2));
        let phase = if h2 {
            Phase::Exempt
        } else {
            UNSERVED.fetch_add(1, Ordering::AcqRel);
            Phase::Head { deadline }
        };
        GuardedStream {
            inner,
            limits,
            phase: Mutex::new(phase),
            fresh: true,
            unserved: AtomicBool::new(!h2),
            head: HeadScan::default(),
            refusal: None,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            _slot: slot,
            _core: core,
            out: None,
        }
    }

    /// Leaves the unserved count, once.
    fn served(&self) {
        if self.unserved.swap(false, Ordering::AcqRel) {
            UNSERVED.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn set_phase(&self, next: Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        if *phase != Phase::Exempt {
            *phase = next;
        }
    }

    fn phase_mut(&mut self) -> &mut Phase {
        self.phase.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// The instant the current wait for a read must end, if any.
    fn deadline(&mut self) -> Option<Instant> {
        match *self.phase_mut() {
            Phase::Head { deadline } => Some(deadline),
            Phase::Idle { until } => Some(until),
            Phase::Busy | Phase::Exempt => None,
        }
    }

    /// Bytes arrived: a keep-alive connection's next head has started, or an h2c connection
    /// announced itself; a head is counted against `max_header_bytes`.
    fn on_read(&mut self, bytes: &[u8]) -> Result<(), HeadTooLarge> {
        let fresh = std::mem::replace(&mut self.fresh, false);
        let header_timeout = self.limits.header_timeout;
        if fresh && bytes.starts_with(H2_PREFACE) {
            // h2c: counted as HTTP/2 connections are (not unserved).
            self.served();
            *self.phase_mut() = Phase::Exempt;
        } else if let Phase::Idle { .. } = self.phase_mut() {
            *self.phase_mut() = Phase::Head {
                deadline: Instant::now() + header_timeout,
            };
            self.head = HeadScan::default();
        }
        match *self.phase_mut() {
            Phase::Head { .. } => self.head.feed(bytes, self.limits.max_header_bytes),
            Phase::Idle { .. } | Phase::Busy | Phase::Exempt => Ok(()),
        }
    }

    /// Drives a refused connection: writes the 431, shuts the sending side, discards what the
    /// client still sends until it stops or the linger ends, then fails the read.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(refusal) = self.refusal.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        // Bounded work per wake-up: a client flooding the socket must not hold the thread.
        for _ in 0..64 {
            let unsent = refusal.response.get(refusal.written..).unwrap_or_default();
            if !unsent.is_empty() {
                match Pin::new(&mut self.inner).poll_write(cx, unsent) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => refusal.written = refusal.written.saturating_add(n),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return poll_until(&mut self.timer, refusal, cx),
                }
            } else if !refusal.sent {
                // Shutting down flushes Pingora's write buffer first, then sends FIN.
                match Pin::new(&mut self.inner).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => refusal.sent = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return poll_until(&mut self.timer, refusal, cx),
                }
            } else {
                let mut scratch = [0u8; 4096];
                let mut discard = ReadBuf::new(&mut scratch);
                match Pin::new(&mut self.inner).poll_read(cx, &mut discard) {
                    Poll::Ready(Ok(())) if !discard.filled().is_empty() => {}
                    Poll::Ready(_) => return Poll::Ready(Err(refusal.error())),
                    Poll::Pending => return poll_until(&mut self.timer, refusal, cx),
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn timed_out(&mut self) -> io::Error {
        let what = match self.phase_mut() {
            Phase::Idle { .. } => "idle keep-alive connection (server.keepalive_timeout)",
            _ => "request head not complete in time (server.header_timeout)",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

/// A refused connection waiting on its socket: fails the read once the linger is over.
fn poll_until(
    timer: &mut Pin<Box<Sleep>>,
    refusal: &Refusal,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    if timer.deadline() != refusal.until {
        timer.as_mut().reset(refusal.until);
    }
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(refusal.error())),
        Poll::Pending => Poll::Pending,
    }
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if let Err(why) = this.on_read(read) {
                    // Pingora never sees the head: it only sees the read fail, once answered.
                    buf.set_filled(before);
                    tracing::debug!(?why, "request head refused with 431");
                    this.refusal = Some(Refusal::new(why));
                    return this.poll_refusal(cx);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(deadline) = this.deadline() else {
                    return Poll::Pending;
                };
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                    Poll::Pending => Poll::Pending,
                }
            }
            failed => failed,
        }
    }
}

/// Pingora's own write buffer size, which a handed-over connection's writes are held to.
const WRITE_BUFFER: usize = pingora::protocols::l4::stream::DEFAULT_L4_WRITE_BUFFER_SIZE;

impl GuardedStream {
    /// A connection handed over from another thread: its writes are buffered here.
    fn moved(mut self) -> Self {
        self.out = Some(WriteBuf {
            held: Vec::with_capacity(WRITE_BUFFER),
            sent: 0,
        });
        self
    }

    /// Writes out what is held, if anything.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(out) = self.out.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while out.sent < out.held.len() {
            let rest = out.held.get(out.sent..).unwrap_or_default();
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)));
                }
                Poll::Ready(Ok(n)) => out.sent = out.sent.saturating_add(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        out.held.clear();
        out.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(out) = this.out.as_ref() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        if out.held.len().saturating_add(buf.len()) > WRITE_BUFFER {
            if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
                return Poll::Ready(Err(e));
            }
        }
        if buf.len() >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if let Some(out) = this.out.as_mut() {
            out.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = std::task::ready!(this.poll_send_held(cx)) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.is_some() {
            // Held like a single write of the first non-empty slice (tokio's default).
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(this).poll_write(cx, first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.out.is_none() && self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        if self.out.is_some() {
            let _ = std::future::poll_fn(|cx| self.poll_send_held(cx)).await;
        }
        self.inner.shutdown().await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    /// Pingora peeks for the h2c preface before reading anything: a client that sends nothing
    /// must not wait here past the head deadline either.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.deadline() {
            Some(deadline) => tokio::time::timeout_at(deadline, self.inner.try_peek(buf))
                .await
                .unwrap_or_else(|_| Err(self.timed_out())),
            None => self.inner.try_peek(buf).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: ConnLimits = ConnLimits {
        header_timeout: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(60),
        max_connections: 4,
        max_header_bytes: 1024,
        body_timeout: Duration::from_secs(30),
    };

    fn guarded(io: tokio::io::DuplexStream) -> GuardedStream {
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        GuardedStream::new(Box::new(io), LIMITS, slot, None)
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_trickles_in_is_cut_at_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = guarded(server);
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut buf = [0u8; 64];
        let error = loop {
            match stream.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.header_timeout);
        trickle.abort();
    }

    /// A connection is unserved (waited for by a draining process, and its first head read
    /// even while shutting down) from its accept until a request starts, however many bytes
    /// of the head have come; an h2c connection is not.
    #[tokio::test]
    async fn a_connection_is_unserved_until_its_first_request_starts() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = guarded(server);
        assert!(stream.unserved.load(Ordering::Acquire));
        client.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        assert!(
            stream.unserved.load(Ordering::Acquire),
            "a head is arriving"
        );
        stream.served();
        assert!(!stream.unserved.load(Ordering::Acquire));
        // Leaving the count is done once, whatever calls it again (the next request, the drop).
        stream.served();
        assert!(!stream.unserved.load(Ordering::Acquire));

        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = guarded(server);
        client.write_all(H2_PREFACE).await.unwrap();
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        assert!(!stream.unserved.load(Ordering::Acquire), "h2c");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_waits_keepalive_timeout_then_a_head_gets_header_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let stream = guarded(server);
        stream.set_phase(Phase::Busy);
        let mut stream = stream;
        // Busy: no deadline while a request is served.
        let mut buf = [0u8; 8];
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), stream.read(&mut buf))
                .await
                .is_err()
        );
        stream.set_phase(Phase::Idle {
            until: Instant::now() + LIMITS.keepalive_timeout,
        });
        tokio::time::sleep(Duration::from_secs(59)).await;
        client.write_all(b"G").await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
        let started = Instant::now();
        let error = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.header_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_connection_is_left_to_http2s_own_timeouts() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = guarded(server);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), stream.read(&mut buf))
                .await
                .is_err()
        );
    }

    /// Reads until the stream fails or ends, returning everything read and the error.
    async fn read_all(stream: &mut GuardedStream) -> (Vec<u8>, Option<io::Error>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    #[test]
    fn a_head_is_counted_to_its_blank_line_across_reads() {
        let head = b"\r\nPOST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2000\r\n\r\n";
        // Every split point, including inside the CRLFCRLF; the body after it is not counted.
        for split in 0..head.len() {
            let mut scan = HeadScan::default();
            let mut wire = head.to_vec();
            wire.extend_from_slice(&[b'x'; 2000]);
            scan.feed(&wire[..split], head.len()).unwrap();
            scan.feed(&wire[split..], head.len()).unwrap();
            assert!(scan.complete, "split at {split}");
            assert_eq!(scan.bytes, head.len(), "split at {split}");
            assert_eq!(scan.lines, 3);
        }
        // One byte over the limit, however it arrives.
        let mut scan = HeadScan::default();
        scan.feed(&head[..10], head.len() - 1).unwrap();
        assert_eq!(
            scan.feed(&head[10..], head.len() - 1),
            Err(HeadTooLarge::Bytes(head.len() - 1))
        );
        // Bare line feeds end a head too (httparse takes them).
        let mut scan = HeadScan::default();
        scan.feed(b"GET / HTTP/1.1\nhost: x\n\nGET /next", 1024)
            .unwrap();
        assert!(scan.complete);
        assert_eq!(scan.bytes, 24);
    }

    #[tokio::test]
    async fn a_moved_connection_sends_a_head_and_its_body_together_when_flushed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut stream = guarded(server).moved();
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        stream.write_all(b"{\"ok\":true}").await.unwrap();
        // Nothing went out yet: held, as Pingora's own buffer would hold it.
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(50), client.read(&mut byte)).await;
        assert!(early.is_err(), "a write went out before the flush");
        stream.flush().await.unwrap();
        let mut got = vec![0u8; 30];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], b"HTTP/1.1 200 OK\r\n\r\n{\"ok\":true}");
        // A write as large as the buffer goes straight out, after what is held.
        stream.write_all(b"x").await.unwrap();
        stream.write_all(&[b'y'; WRITE_BUFFER]).await.unwrap();
        let mut got = vec![0u8; WRITE_BUFFER + 1];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], b'x');
        assert!(got[1..].iter().all(|&b| b == b'y'));
        // Shutting down sends what is held first.
        stream.write_all(b"tail").await.unwrap();
        Shutdown::shutdown(&mut stream).await;
        let mut rest = [0u8; 4];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"tail");
    }

    /// The byte-at-a-time scan that `HeadScan::feed` replaced with a line-at-a-time one: the
    /// reference the new one must match.
    fn feed_bytewise(scan: &mut HeadScan, bytes: &[u8]) {
        if scan.complete {
            return;
        }
        let mut taken = bytes.len();
        for (i, b) in bytes.iter().enumerate() {
            match b {
                b'\n' if scan.started => {
                    scan.newlines += 1;
                    if scan.newlines == 2 {
                        scan.complete = true;
                        taken = i + 1;
                        break;
                    }
                    scan.lines += 1;
                }
                b'\r' | b'\n' => {}
                _ => {
                    scan.started = true;
                    scan.newlines = 0;
                }
            }
        }
        scan.bytes += taken;
    }

    #[test]
    fn the_line_scan_counts_as_a_byte_scan_would() {
        // Every string of up to 8 bytes over {a, CR, LF}, split at every point.
        let alphabet = [b'a', b'\r', b'\n'];
        for len in 0..=8u32 {
            for mut n in 0..3usize.pow(len) {
                let mut wire = Vec::new();
                for _ in 0..len {
                    wire.push(alphabet[n % 3]);
                    n /= 3;
                }
                for split in 0..=wire.len() {
                    let (mut fast, mut slow) = (HeadScan::default(), HeadScan::default());
                    for part in [&wire[..split], &wire[split..]] {
                        let _ = fast.feed(part, 1 << 20);
                        feed_bytewise(&mut slow, part);
                    }
                    assert_eq!(fast, slow, "{wire:?} split at {split}");
                }
            }
        }
    }

    #[test]
    fn more_header_fields_than_pingora_parses_are_refused() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADER_FIELDS {
            head.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        let mut scan = HeadScan::default();
        scan.feed(&head, 1 << 20).unwrap();
        assert_eq!(
            scan.feed(b"x-last: v\r\n", 1 << 20),
            Err(HeadTooLarge::Fields)
        );
        let mut exact = HeadScan::default();
        head.extend_from_slice(b"\r\n");
        exact.feed(&head, 1 << 20).unwrap();
        assert!(exact.complete);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_over_max_header_bytes_is_answered_431_and_closed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut stream = guarded(server);
        let sender = tokio::spawn(async move {
            client
                .write_all(b"GET / HTTP/1.1\r\nx-big: ")
                .await
                .unwrap();
            // Split across many writes, never ending the head.
            for _ in 0..40 {
                if client.write_all(&[b'a'; 100]).await.is_err() {
                    break;
                }
            }
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        });
        let (got, error) = read_all(&mut stream).await;
        // Pingora is handed only what fit under the limit, then an error.
        assert!(got.len() <= LIMITS.max_header_bytes);
        assert_eq!(error.unwrap().kind(), io::ErrorKind::InvalidData);
        drop(stream);
        let answer = String::from_utf8(sender.await.unwrap()).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "request_header_fields_too_large");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[tokio::test(start_paused = true)]
    async fn each_keepalive_request_gets_its_own_head_allowance() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut stream = guarded(server);
        // Two heads of 700 bytes each: 1,400 on one connection, each under the 1,024 limit.
        let head = |n: usize| {
            let mut h = b"GET / HTTP/1.1\r\nx-pad: ".to_vec();
            h.resize(n - 4, b'p');
            h.extend_from_slice(b"\r\n\r\n");
            h
        };
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            client.write_all(&head(700)).await.unwrap();
            let mut got = 0;
            while got < 700 {
                got += stream.read(&mut buf).await.unwrap();
            }
            stream.set_phase(Phase::Busy);
            stream.set_phase(Phase::Idle {
                until: Instant::now() + LIMITS.keepalive_timeout,
            });
        }
        // A third one over the limit is still refused.
        client.write_all(&head(1100)).await.unwrap();
        let (_, error) = read_all(&mut stream).await;
        assert_eq!(error.unwrap().kind(), io::ErrorKind::InvalidData);
    }
}
