//! Reading a provider's HTTP/1.1 answer on a connection of our own: the head (interim `1xx`
//! answers skipped), then the body as it arrives, framed by its length, by chunks, or by the
//! connection's close; and whether the connection can carry the next request.
//!
//! Pingora's client session did this before, at 9.5k instructions a request (a callgrind count
//! of the gateway at c=1): it builds a `ResponseHeader` with a header-case map, a body reader
//! with a buffer of its own, and a timer per read. Lumen only needs the status, the headers in
//! `http`'s map (values are slices of the one buffer the head was read into) and the body bytes
//! handed out without a copy (`split_to` of that buffer). Every read is bounded by the
//! provider's `timeout`; every size the provider controls (head, header count, chunk-size line,
//! trailers) is bounded too.
//!
//! Cancel-safe: a read dropped before it completes loses nothing (bytes land in the buffer
//! only when a read completes, and the framing state changes only on bytes in the buffer), so
//! the stream can poll a read once and drop it (`ready_now`), or race it in a `select!`.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, Result};
use tokio::io::AsyncReadExt;

/// Most bytes of a response head (status line and headers): 64 KiB less one, so that every
/// offset into it fits a `u16`.
const MAX_HEAD: usize = u16::MAX as usize;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 96;
/// Most interim answers before the real one (a provider looping on `103 Early Hints` must not
/// hold a request forever).
const MAX_INTERIM: usize = 8;
/// Longest chunk-size line (size, extensions and CRLF), and longest trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// The read buffer's size, and the least room made before each read.
const BUFFER: usize = 16 * 1024;
const MIN_READ: usize = 4 * 1024;

/// A provider's response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// One exchange's answer, read from the provider's connection.
pub struct Answer {
    stream: Stream,
    /// Bytes read and not handed out yet.
    buf: BytesMut,
    /// Bounds each read.
    timeout: Duration,
    body: Body,
    /// Whether the connection can carry another request once the body has been read whole.
    keep_alive: bool,
}

/// Where the body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// The head is not read yet.
    Head,
    /// `content-length`: this many bytes left.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked(Chunk),
    /// Neither: the body ends when the provider closes the connection.
    UntilClose,
    /// Read whole.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of trailers seen so far.
    Trailers(usize),
}

/// What the buffer holds next.
enum Step {
    Data(Bytes),
    End,
    /// More bytes are needed.
    More,
}

impl Answer {
    /// An answer to read on `stream`, where a request was just written whole.
    pub fn new(stream: Stream, timeout: Duration) -> Answer {
        Answer {
            stream,
            buf: BytesMut::with_capacity(BUFFER),
            timeout,
            body: Body::Head,
            keep_alive: false,
        }
    }

    /// Reads the response head, skipping interim `1xx` answers: they are not the answer, and
    /// reading a body after one would be a protocol error.
    pub async fn read_head(&mut self) -> Result<Head> {
        let mut interim = 0usize;
        loop {
            match self.parse_head()? {
                Some(head) if head.status.is_informational() => {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Error::e_explain(
                            ErrorType::InvalidHTTPHeader,
                            "101 from a provider",
                        );
                    }
                    interim = interim.saturating_add(1);
                    if interim > MAX_INTERIM {
                        return Error::e_explain(
                            ErrorType::InvalidHTTPHeader,
                            "too many interim answers",
                        );
                    }
                }
                Some(head) => return Ok(head),
                None => {
                    if self.buf.len() >= MAX_HEAD {
                        return Error::e_explain(
                            ErrorType::InvalidHTTPHeader,
                            "response head too large",
                        );
                    }
                    if self.fill().await? == 0 {
                        return Error::e_explain(
                            ErrorType::ConnectionClosed,
                            "closed before the answer's head",
                        );
                    }
                }
            }
        }
    }

    /// The next bytes of the body (`None` at its end), waiting for them when none are here.
    pub async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.step()? {
                Step::Data(bytes) => return Ok(Some(bytes)),
                Step::End => return Ok(None),
                Step::More => {}
            }
            if self.fill().await? == 0 {
                if self.body == Body::UntilClose {
                    self.body = Body::Done;
                    self.keep_alive = false;
                    return Ok(None);
                }
                return Error::e_explain(ErrorType::ConnectionClosed, "answer cut short");
            }
        }
    }

    /// Whether the body has been read whole.
    pub fn done(&self) -> bool {
        self.body == Body::Done
    }

    /// The connection, when it can carry another request: the answer was read whole, neither
    /// side asked to close it, and the provider sent nothing beyond the answer.
    pub fn into_reusable(self) -> Option<Stream> {
        (self.done() && self.keep_alive && self.buf.is_empty()).then_some(self.stream)
    }

    /// Reads what the provider sent into the buffer (at least [`MIN_READ`] bytes of room);
    /// 0 when it closed the connection.
    async fn fill(&mut self) -> Result<usize> {
        if self.buf.capacity().saturating_sub(self.buf.len()) < MIN_READ {
            self.buf.reserve(BUFFER);
        }
        match pingora_timeout::timeout(self.timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(Error::because(
                ErrorType::ReadError,
                "reading the answer",
                e,
            )),
            Err(_) => Error::e_explain(ErrorType::ReadTimedout, "reading the answer"),
        }
    }

    /// Parses a head at the start of the buffer, if it is all there, and takes it out of the
    /// buffer; sets the body's framing from it.
    fn parse_head(&mut self) -> Result<Option<Head>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        // Left uninitialized: httparse writes the fields it finds (an initialized array of 96
        // would be written whole on every parse).
        let mut fields =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            &self.buf,
            &mut fields,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) if length <= MAX_HEAD => length,
            Ok(httparse::Status::Complete(_)) => return invalid("response head too large"),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return invalid("too many response headers"),
            Err(_) => return invalid("malformed response head"),
        };
        let Some(status) = response
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
        else {
            return invalid("malformed response status");
        };
        // Where each field lies in the head (offsets below MAX_HEAD): the head becomes one
        // `Bytes` the values are slices of (no copy per value).
        let base = self.buf.as_ptr() as usize;
        let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
        let count = response.headers.len();
        let mut framing = Framing {
            http11: response.version == Some(1),
            ..Framing::default()
        };
        let offset = |p: *const u8| u16::try_from((p as usize).wrapping_sub(base)).ok();
        for (field, span) in response.headers.iter().zip(spans.iter_mut()) {
            framing.see(field.name.as_bytes(), field.value)?;
            let (Some(name_at), Some(value_at), Ok(name_len), Ok(value_len)) = (
                offset(field.name.as_ptr()),
                offset(field.value.as_ptr()),
                u16::try_from(field.name.len()),
                u16::try_from(field.value.len()),
            ) else {
                return invalid("response head too large");
            };
            *span = (name_at, name_len, value_at, value_len);
        }
        let head_bytes = self.buf.split_to(length).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_at, name_len, value_at, value_len) in spans.iter().take(count) {
            let (Some(name), Some(value)) = (
                span(&head_bytes, name_at.into(), name_len.into()),
                span(&head_bytes, value_at.into(), value_len.into()),
            ) else {
                return invalid("malformed response head");
            };
            let Ok(name) = HeaderName::from_bytes(&name) else {
                return invalid("malformed response header name");
            };
            let Ok(value) = HeaderValue::from_maybe_shared(value) else {
                return invalid("malformed response header value");
            };
            headers.append(name, value);
        }
        if !status.is_informational() {
            self.keep_alive = framing.keep_alive();
            self.body = framing.body(status)?;
        }
        Ok(Some(Head { status, headers }))
    }

    /// The next piece of the body the buffer holds, by its framing.
    fn step(&mut self) -> Result<Step> {
        loop {
            match self.body {
                Body::Head => return invalid("body read before the head"),
                Body::Done => return Ok(Step::End),
                Body::Length(left) => {
                    let Some(bytes) = self.take_upto(left) else {
                        return Ok(Step::More);
                    };
                    // Done with the last byte: `done()` says so before the next read.
                    self.body = match left.saturating_sub(bytes.len() as u64) {
                        0 => Body::Done,
                        n => Body::Length(n),
                    };
                    return Ok(Step::Data(bytes));
                }
                Body::UntilClose => {
                    if self.buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(self.buf.split().freeze()));
                }
                Body::Chunked(Chunk::Size) => {
                    let Some(end) = memchr::memchr(b'\n', &self.buf) else {
                        if self.buf.len() > MAX_CHUNK_LINE {
                            return invalid("chunk-size line too long");
                        }
                        return Ok(Step::More);
                    };
                    if end >= MAX_CHUNK_LINE {
                        return invalid("chunk-size line too long");
                    }
                    let size =
                        chunk_size(self.buf.get(..end).unwrap_or_default()).ok_or_else(|| {
                            Error::explain(ErrorType::InvalidHTTPHeader, "bad chunk size")
                        })?;
                    self.buf.advance(end.saturating_add(1));
                    self.body = Body::Chunked(match size {
                        0 => Chunk::Trailers(0),
                        n => Chunk::Data(n),
                    });
                }
                Body::Chunked(Chunk::Data(left)) => {
                    let Some(bytes) = self.take_upto(left) else {
                        return Ok(Step::More);
                    };
                    let left = left.saturating_sub(bytes.len() as u64);
                    self.body = Body::Chunked(match left {
                        0 => Chunk::DataEnd,
                        n => Chunk::Data(n),
                    });
                    return Ok(Step::Data(bytes));
                }
                Body::Chunked(Chunk::DataEnd) => match self.buf.first() {
                    None => return Ok(Step::More),
                    Some(b'\n') => {
                        self.buf.advance(1);
                        self.body = Body::Chunked(Chunk::Size);
                    }
                    Some(b'\r') => match self.buf.get(1) {
                        None => return Ok(Step::More),
                        Some(b'\n') => {
                            self.buf.advance(2);
                            self.body = Body::Chunked(Chunk::Size);
                        }
                        Some(_) => return invalid("chunk data longer than its size"),
                    },
                    Some(_) => return invalid("chunk data longer than its size"),
                },
                Body::Chunked(Chunk::Trailers(seen)) => {
                    let Some(end) = memchr::memchr(b'\n', &self.buf) else {
                        if seen.saturating_add(self.buf.len()) > MAX_TRAILERS {
                            return invalid("trailers too large");
                        }
                        return Ok(Step::More);
                    };
                    let seen = seen.saturating_add(end).saturating_add(1);
                    if seen > MAX_TRAILERS {
                        return invalid("trailers too large");
                    }
                    let line = self.buf.get(..end).unwrap_or_default();
                    let blank = line.is_empty() || line == b"\r";
                    self.buf.advance(end.saturating_add(1));
                    self.body = if blank {
                        Body::Done
                    } else {
                        Body::Chunked(Chunk::Trailers(seen))
                    };
                    if blank {
                        return Ok(Step::End);
                    }
                }
            }
        }
    }

    /// Up to `left` bytes from the front of the buffer; `None` when it is empty.
    fn take_upto(&mut self, left: u64) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let n = usize::try_from(left).map_or(self.buf.len(), |l| l.min(self.buf.len()));
        Some(self.buf.split_to(n).freeze())
    }
}

/// A malformed or oversized answer.
fn invalid<T>(why: &'static str) -> Result<T> {
    Error::e_explain(ErrorType::InvalidHTTPHeader, why)
}

/// `bytes[at..at + len]` as a slice of `bytes`, if it lies inside.
fn span(bytes: &Bytes, at: usize, len: usize) -> Option<Bytes> {
    let end = at.checked_add(len)?;
    (end <= bytes.len()).then(|| bytes.slice(at..end))
}

/// A chunk-size line's size (hex, before any `;extension`), without its line end.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut size: u64 = 0;
    for &d in digits {
        let v = u64::from(char::from(d).to_digit(16)?);
        size = size.checked_mul(16)?.checked_add(v)?;
    }
    Some(size)
}

/// What a head's fields say about its body and its connection.
#[derive(Default)]
struct Framing {
    http11: bool,
    length: Option<u64>,
    chunked: bool,
    /// Some `transfer-encoding` other than a final `chunked`: read until close.
    other_coding: bool,
    close: bool,
    keep_alive: bool,
}

impl Framing {
    fn see(&mut self, name: &[u8], value: &[u8]) -> Result<()> {
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (length, self.length) {
                (None, _) => {
                    return Error::e_explain(ErrorType::InvalidHTTPHeader, "bad content-length")
                }
                (Some(l), Some(seen)) if l != seen => {
                    return Error::e_explain(
                        ErrorType::InvalidHTTPHeader,
                        "conflicting content-length",
                    )
                }
                (l, _) => self.length = l,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The codings apply in order: the body is chunked only if `chunked` is the last.
            let last = value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            self.chunked = last.eq_ignore_ascii_case(b"chunked");
            self.other_coding = !self.chunked;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }

    /// The body's framing for an answer with `status`.
    fn body(&self, status: StatusCode) -> Result<Body> {
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(Body::Done);
        }
        Ok(if self.chunked {
            Body::Chunked(Chunk::Size)
        } else if self.other_coding {
            Body::UntilClose
        } else {
            match self.length {
                Some(0) => Body::Done,
                Some(n) => Body::Length(n),
                None => Body::UntilClose,
            }
        })
    }

    /// Whether the connection may carry another request after this answer. An answer with
    /// both a length and a transfer coding is suspect (request smuggling): never reused.
    fn keep_alive(&self) -> bool {
        let framed = !(self.length.is_some() && (self.chunked || self.other_coding));
        framed && !self.close && (self.http11 || self.keep_alive)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// An answer reading what `server` writes: `pieces` written one at a time, with a pause
    /// between them (so each can arrive in a read of its own), then the server side, kept open
    /// unless `close`.
    async fn answer_of(
        pieces: &[&[u8]],
        close: bool,
    ) -> (Answer, tokio::task::JoinHandle<tokio::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for piece in pieces {
                server.write_all(&piece).await.unwrap();
                server.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if close {
                server.shutdown().await.unwrap();
            }
            server
        });
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(client));
        (Answer::new(stream, Duration::from_secs(5)), writer)
    }

    async fn body_of(answer: &mut Answer) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(bytes) = answer.read_body().await? {
            assert!(!bytes.is_empty());
            body.extend_from_slice(&bytes);
        }
        Ok(body)
    }

    #[tokio::test]
    async fn a_length_framed_answer_in_pieces_is_read_whole_and_its_connection_kept() {
        let (mut a, _server) = answer_of(
            &[
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: r-1\r\nconte",
                b"nt-length: 11\r\n\r\n{\"a\":",
                b"\"bcd\"}",
            ],
            false,
        )
        .await;
        let head = a.read_head().await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.headers["x-request-id"], "r-1");
        assert_eq!(head.headers["content-length"], "11");
        assert!(!a.done());
        assert_eq!(body_of(&mut a).await.unwrap(), b"{\"a\":\"bcd\"}");
        assert!(a.done());
        assert!(a.into_reusable().is_some());
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded_across_every_split() {
        let wire: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: t\r\n\r\n";
        for split in 1..wire.len() {
            let (head, rest) = wire.split_at(split);
            let (mut a, _server) = answer_of(&[head, rest], false).await;
            a.read_head().await.unwrap();
            assert_eq!(
                body_of(&mut a).await.unwrap(),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "split at {split}"
            );
            assert!(a.into_reusable().is_some(), "split at {split}");
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_an_endless_run_of_them_refused() {
        let (mut a, _server) = answer_of(
            &[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n",
                b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            ],
            false,
        )
        .await;
        let head = a.read_head().await.unwrap();
        assert_eq!(head.status, 201);
        assert!(head.headers.get("link").is_none());
        assert_eq!(body_of(&mut a).await.unwrap(), b"ok");

        let many = b"HTTP/1.1 103 Early Hints\r\n\r\n".repeat(MAX_INTERIM + 1);
        let (mut a, _server) = answer_of(&[&many], false).await;
        let e = a.read_head().await.unwrap_err();
        assert_eq!(e.etype(), &ErrorType::InvalidHTTPHeader);
    }

    #[tokio::test]
    async fn a_close_delimited_answer_ends_at_the_close_and_is_not_reused() {
        let (mut a, _server) = answer_of(&[b"HTTP/1.1 200 OK\r\n\r\nsome ", b"bytes"], true).await;
        a.read_head().await.unwrap();
        assert_eq!(body_of(&mut a).await.unwrap(), b"some bytes");
        assert!(a.done());
        assert!(a.into_reusable().is_none());
    }

    #[tokio::test]
    async fn answers_cut_short_are_errors() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        ] {
            let (mut a, _server) = answer_of(&[wire], true).await;
            a.read_head().await.unwrap();
            let e = body_of(&mut a).await.unwrap_err();
            assert_eq!(e.etype(), &ErrorType::ConnectionClosed);
        }
        // Closed before a head.
        let (mut a, _server) = answer_of(&[b"HTTP/1.1 200"], true).await;
        let e = a.read_head().await.unwrap_err();
        assert_eq!(e.etype(), &ErrorType::ConnectionClosed);
    }

    #[tokio::test]
    async fn malformed_and_oversized_answers_are_refused() {
        let huge_line = format!("{}\r\n", "f".repeat(MAX_CHUNK_LINE + 1));
        let many_fields: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let cases: Vec<(Vec<u8>, bool)> = vec![
            (b"NOT HTTP\r\n\r\n".to_vec(), false),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n".to_vec(),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n".to_vec(),
                false,
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(), false),
            (
                format!("HTTP/1.1 200 OK\r\n{many_fields}\r\n").into_bytes(),
                false,
            ),
            (
                format!("HTTP/1.1 200 OK\r\nx: {}\r\n", "v".repeat(MAX_HEAD)).into_bytes(),
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n"
                    .to_vec(),
                true,
            ),
            (
                format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{huge_line}")
                    .into_bytes(),
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n".to_vec(),
                true,
            ),
        ];
        for (wire, in_body) in cases {
            let (mut a, _server) = answer_of(&[&wire], false).await;
            let e = match a.read_head().await {
                Err(e) => {
                    assert!(!in_body, "{}", String::from_utf8_lossy(&wire));
                    e
                }
                Ok(_) => body_of(&mut a).await.unwrap_err(),
            };
            assert_eq!(
                e.etype(),
                &ErrorType::InvalidHTTPHeader,
                "{}",
                String::from_utf8_lossy(&wire)
            );
        }
    }

    #[tokio::test]
    async fn only_a_cleanly_framed_persistent_answer_read_whole_keeps_its_connection() {
        for (wire, kept) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", false),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
            (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", true),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", false),
            // Bytes beyond the answer: the provider is not speaking HTTP as we are.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1", false),
        ] {
            let (mut a, _server) = answer_of(&[wire], false).await;
            a.read_head().await.unwrap();
            body_of(&mut a).await.unwrap();
            assert_eq!(a.into_reusable().is_some(), kept, "{}", String::from_utf8_lossy(wire));
        }
        // Not read whole.
        let (mut a, _server) =
            answer_of(&[b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nok"], false).await;
        a.read_head().await.unwrap();
        assert!(a.read_body().await.unwrap().is_some());
        assert!(a.into_reusable().is_none());
    }

    #[tokio::test]
    async fn a_read_dropped_before_it_completes_loses_nothing() {
        let (mut a, _server) = answer_of(
            &[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
                b"3\r\ndef\r\n0\r\n\r\n",
            ],
            false,
        )
        .await;
        a.read_head().await.unwrap();
        let mut body = Vec::new();
        loop {
            // Polled once and dropped when not ready, as the stream's batching does.
            match super::super::ready::ready_now(a.read_body()) {
                Some(Ok(Some(bytes))) => body.extend_from_slice(&bytes),
                Some(Ok(None)) => break,
                Some(Err(e)) => panic!("{e}"),
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        assert_eq!(body, b"abcdef");
    }

    #[tokio::test]
    async fn a_provider_that_stops_sending_times_out() {
        let (mut a, _server) =
            answer_of(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"], false).await;
        a.timeout = Duration::from_millis(50);
        a.read_head().await.unwrap();
        assert_eq!(a.read_body().await.unwrap().unwrap(), &b"ab"[..]);
        let e = a.read_body().await.unwrap_err();
        assert_eq!(e.etype(), &ErrorType::ReadTimedout);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"1a\r"), Some(26));
        assert_eq!(chunk_size(b"FF ; name=v\r"), Some(255));
        assert_eq!(chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"\r"), None);
        assert_eq!(chunk_size(b"-1"), None);
        assert_eq!(chunk_size(b"1 2"), None);
        assert_eq!(chunk_size(b"10000000000000000"), None);
    }
}
