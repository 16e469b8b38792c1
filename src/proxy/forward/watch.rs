//! What watches an answer on its way from the provider to the client, so the streaming loop
//! owns no pipeline state: the cache fill (and the coalesced followers behind it), the capture
//! of an answer the pipeline rewrites, the usage tap (budgets, quotas, the ledger), the strip of
//! a usage chunk the client did not ask for, and the `[DONE]` watch that tells a finished
//! stream from a cut one. The pipeline hands a [`Watchers`] to the forwarder and reads it back.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::{Arc, LazyLock};

use bytes::{Bytes, BytesMut};
use lumen_plugins::sse::usage::{UsageStrip, UsageTap};
use memchr::memmem;
use pingora::http::ResponseHeader;

use super::adapt::FromMessages;
use super::translate::TranslatedStream;
use crate::openai::Endpoint;
use crate::proxy::cache::fill::Fill;
use crate::proxy::cache::store::Cache;
use crate::upstream::health::InFlight;
use crate::upstream::provider::Api;

/// A provider's answer kept for the pipeline instead of being streamed to the client.
pub struct Captured {
    /// Most bytes kept; a larger answer fails the request.
    pub limit: usize,
    pub head: Option<Box<ResponseHeader>>,
    pub body: BytesMut,
}

/// Everything that sees an answer's chunks, in the order they see each one: usage tap, `[DONE]`
/// watch, cache fill, then the strip (which may hold back or drop bytes for the client).
#[derive(Default)]
pub struct Watchers {
    /// Records the answer for the cache and coalesced followers (a cacheable miss).
    pub fill: Option<Fill>,
    /// Where a complete fill is stored (the node's cache).
    sink: Option<Arc<Cache>>,
    /// Keep the provider's answer here instead of sending it (the pipeline rewrites it).
    pub capture: Option<Captured>,
    /// The attempt's place in its provider's in-flight count (what "busy" and least-loaded
    /// balancing read): given back once the provider's answer has fully arrived, before the
    /// client is sent its end, so a client that asks again at once finds the provider free.
    in_flight: Option<InFlight>,
    /// Lumen asked the provider for a usage chunk the client did not ask for (set per attempt).
    strip_usage: bool,
    /// Whether the committed answer is an event stream.
    sse: bool,
    /// Reads usage off a success (committed 2xx answers only).
    tap: Option<UsageTap>,
    strip: Option<UsageStrip>,
    done: DoneWatch,
    /// The client speaks another API: a successful stream is translated event by event (and
    /// an error answer reshaped when the API has its own error shape).
    translate: Option<TranslatedStream>,
    /// Whether `translate` applies to the committed answer.
    translating: bool,
    /// The provider speaks another API than chat completions (set per attempt): its answer is
    /// made a chat answer before any other watcher sees it.
    adapt: Option<FromMessages>,
    /// The provider speaks the client's own API (a Messages request to `api: anthropic`, set
    /// per attempt): its answer goes to the client as it is, untranslated.
    native: bool,
    /// What ends the committed stream.
    end: End,
    /// The answer's bytes as the chat-shaped watchers see them, for a trace that records
    /// content (`tracing.capture_content`).
    answer: Option<BytesMut>,
}

/// Most bytes of an answer kept for its trace (the text recorded is cut shorter still).
const ANSWER_LIMIT: usize = 256 * 1024;

impl Watchers {
    /// Watchers for an answer that fills the cache (`Watchers::default()` watches for nothing
    /// but usage).
    pub fn filling(fill: Fill, sink: Arc<Cache>) -> Watchers {
        Watchers {
            fill: Some(fill),
            sink: Some(sink),
            ..Watchers::default()
        }
    }

    /// Watchers for an answer kept for the pipeline, up to `limit` bytes.
    pub fn capturing(limit: usize) -> Watchers {
        Watchers {
            capture: Some(Captured {
                limit,
                head: None,
                body: BytesMut::new(),
            }),
            ..Watchers::default()
        }
    }

    /// Keeps the answer for the pipeline (up to `limit` bytes) instead of sending it; the
    /// other watchers (a cache fill) still see it.
    pub fn capture(&mut self, limit: usize) {
        self.capture = Some(Captured {
            limit,
            head: None,
            body: BytesMut::new(),
        });
    }

    /// Translates a successful streamed answer for a client that speaks another API.
    pub fn translating(&mut self, stream: TranslatedStream) {
        self.translate = Some(stream);
    }

    /// Before each attempt: the API its provider speaks, for a request from a client of
    /// `endpoint`'s API.
    pub(super) fn provider_api(&mut self, api: Api, endpoint: Endpoint) {
        self.native = endpoint.translated() && api.native_for(endpoint);
        self.end = match (self.native, endpoint) {
            (true, Endpoint::Messages) => End::MessageStop,
            (true, _) => End::ResponseDone,
            (false, _) => End::Done,
        };
        self.adapt = (api == Api::Anthropic && !self.native).then(FromMessages::new);
    }

    /// Whether the committed answer is in the client's own API already (no translation).
    pub fn native(&self) -> bool {
        self.native
    }

    /// Before each attempt: whether the usage chunk asked for on the client's behalf is to be
    /// stripped from what the client sees.
    pub(super) fn strip_usage(&mut self, strip: bool) {
        self.strip_usage = strip;
    }

    /// The answer is committed with this status and framing: the watchers start.
    pub(super) fn commit(&mut self, status: u16, sse: bool, provider: &str) {
        self.sse = sse;
        if let Some(adapt) = self.adapt.as_mut() {
            adapt.commit(status, sse);
        }
        if let Some(fill) = self.fill.as_mut() {
            fill.head(status, sse, provider);
        }
        // Usage is read off every success: for token budgets and quotas, metrics and the
        // usage ledger.
        self.tap = (status < 300).then(|| UsageTap::new(sse));
        // The usage chunk Lumen asked for on the client's behalf is not the client's to see.
        self.strip = (sse && self.strip_usage).then(UsageStrip::default);
        self.done = DoneWatch {
            end: self.end,
            ..DoneWatch::default()
        };
        self.translating = !self.native
            && self
                .translate
                .as_mut()
                .is_some_and(|t| t.commit(status, sse));
    }

    /// One chunk as the provider sent it: every watcher sees it. Returns what the client is to
    /// get (empty when the strip holds it back or drops it).
    pub(super) fn chunk(&mut self, chunk: Bytes) -> Bytes {
        match self.adapt.as_mut() {
            Some(adapt) => {
                let chat = adapt.filter(&chunk);
                self.watch(chat)
            }
            None => self.watch(chunk),
        }
    }

    /// Keeps the committed success's bytes for its trace (`capture_content`).
    pub(super) fn record_answer(&mut self) {
        self.answer = Some(BytesMut::new());
    }

    /// What [`Watchers::record_answer`] kept, once, with whether it is an event stream.
    pub(super) fn take_answer(&mut self) -> Option<(bool, BytesMut)> {
        self.answer.take().map(|a| (self.sse, a))
    }

    /// One chunk of a chat answer: every watcher after the adapter sees it.
    fn watch(&mut self, chunk: Bytes) -> Bytes {
        if let Some(tap) = self.tap.as_mut() {
            tap.observe(&chunk);
        }
        if let Some(answer) = self.answer.as_mut() {
            let room = ANSWER_LIMIT.saturating_sub(answer.len());
            answer.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        }
        if self.sse {
            self.done.observe(&chunk);
        }
        if let Some(fill) = self.fill.as_mut() {
            fill.chunk(&chunk);
        }
        let chunk = match self.strip.as_mut() {
            Some(strip) => strip.filter(chunk),
            None => chunk,
        };
        match self.translate.as_mut().filter(|_| self.translating) {
            Some(t) => t.filter(&chunk),
            None => chunk,
        }
    }

    /// For a translated stream that broke: its closing event (`response.failed`, Anthropic's
    /// `error`) in the client's API; `None` for an untranslated one (the caller sends an
    /// `error` event).
    pub(super) fn failed_event(&mut self, message: &str) -> Option<Bytes> {
        // A stream passed on in the client's own API ends with that API's `error` event (the
        // SDKs skip an unnamed one).
        let native = match self.end {
            End::MessageStop => Some(crate::translate::messages::error_body(500, message)),
            End::ResponseDone => Some(serde_json::json!({
                "type": "error", "code": "server_error", "message": message, "param": null,
            })),
            End::Done => None,
        };
        if let Some(error) = native {
            let mut out = b"\n\n".to_vec();
            crate::translate::write_sse(&mut out, &crate::translate::Event::new("error", &error));
            return Some(Bytes::from(out));
        }
        self.translate
            .as_mut()
            .filter(|_| self.translating)
            .map(|t| t.fail(message))
    }

    /// The answer broke: its cache fill is dropped now, which ends its flight as failed, before
    /// this client is told. A client that saw the end and asks again at once must find no
    /// flight left to follow (it would follow a leader that can only fail).
    pub(super) fn broke(&mut self) {
        self.fill = None;
        self.in_flight = None;
    }

    /// The answer arrived whole and was a complete answer: it is stored (and its flight ended)
    /// now, before the client is sent the last of it, so a client that asks again at once
    /// finds it cached instead of following a flight that is about to end.
    pub(super) fn complete(&mut self) {
        if let (Some(fill), Some(cache)) = (self.fill.take(), self.sink.as_ref()) {
            cache.keep(fill.finish().into_iter().collect());
        }
    }

    /// Holds the attempt's in-flight count until [`Watchers::answered`].
    pub(super) fn in_flight(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
    }

    /// The provider is done with this attempt (its answer arrived whole, or the attempt
    /// ended): its in-flight count is given back.
    pub(super) fn answered(&mut self) {
        self.in_flight = None;
    }

    /// Whether the strip (or a translation) is on: the answer's length changes, and an empty
    /// chunk from [`Watchers::chunk`] is nothing to write.
    pub(super) fn strips(&self) -> bool {
        self.strip.is_some() || self.translating || self.adapt.is_some()
    }

    /// What the strip still holds once the provider's answer ended (empty without a strip).
    pub(super) fn rest(&mut self) -> Bytes {
        let adapted = match self.adapt.as_mut().map(FromMessages::end) {
            Some(end) if !end.is_empty() => self.watch(end),
            _ => Bytes::new(),
        };
        let rest = self
            .strip
            .as_mut()
            .map(UsageStrip::finish)
            .unwrap_or_default();
        let rest = match self.translate.as_mut().filter(|_| self.translating) {
            Some(t) => {
                let events = t.filter(&rest);
                let end = t.end();
                join(events, end)
            }
            None => rest,
        };
        join(adapted, rest)
    }

    /// The finished `response` of a translated Responses stream that completed, once.
    pub(super) fn completed_response(&mut self) -> Option<serde_json::Value> {
        let t = self.translate.as_mut().filter(|_| self.translating)?;
        // A whole answer to a stream request is translated now that it is all here.
        t.whole_arrived();
        t.take_completed()
    }

    /// A translated stream's opening events, to write with the response head.
    pub(super) fn opening(&mut self) -> Bytes {
        match self.translate.as_mut().filter(|_| self.translating) {
            Some(t) => t.opening(),
            None => Bytes::new(),
        }
    }

    /// Whether a whole answer goes to the client as a translated stream of events (a
    /// provider that ignored `stream`): its head then says `text/event-stream`.
    pub(super) fn streams_whole(&self) -> bool {
        self.translating
            && self
                .translate
                .as_ref()
                .is_some_and(TranslatedStream::streams_whole)
    }

    /// Whether the stream's `data: [DONE]` went by.
    pub(super) fn done_seen(&self) -> bool {
        self.done.seen()
    }

    /// The usage tap of a committed success.
    pub(super) fn tap(&mut self) -> Option<&mut UsageTap> {
        self.tap.as_mut()
    }
}

/// What ends a complete stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum End {
    /// Chat completions: `data: [DONE]`.
    #[default]
    Done,
    /// Anthropic's Messages API, passed on untranslated: `event: message_stop`.
    MessageStop,
    /// OpenAI's Responses API, passed on untranslated: `event: response.completed` (or
    /// `.incomplete`, `.failed`: the provider's own end).
    ResponseDone,
}

/// Watches a stream for the line that ends it ([`End`]), across chunk boundaries.
#[derive(Default)]
struct DoneWatch {
    /// The last bytes of the stream so far (a mark split across chunks is found), never
    /// more than a mark's length: each chunk is scanned once, not copied.
    tail: Vec<u8>,
    seen: bool,
    end: End,
}

impl DoneWatch {
    /// What precedes the end word on its line.
    const MARKS: [&'static [u8]; 2] = [b"data: ", b"data:"];
    const EVENT_MARKS: [&'static [u8]; 2] = [b"event: ", b"event:"];
    const KEEP: usize = 28;

    fn observe(&mut self, chunk: &[u8]) {
        if self.seen {
            return;
        }
        // One SIMD substring search per chunk (this runs on every chunk of every stream), with
        // the searcher built once: `memmem::find` builds one per call.
        static DONE: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"[DONE]"));
        static STOP: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"message_stop"));
        static RESPONSE: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"response."));
        let (word, marks) = match self.end {
            End::Done => (&*DONE, &Self::MARKS),
            End::MessageStop => (&*STOP, &Self::EVENT_MARKS),
            End::ResponseDone => (&*RESPONSE, &Self::EVENT_MARKS),
        };
        let responses = self.end == End::ResponseDone;
        let has = |bytes: &[u8]| {
            word.find_iter(bytes).any(|at| {
                let before = bytes.get(..at).unwrap_or_default();
                let after = bytes.get(at.saturating_add(9)..).unwrap_or_default();
                // The mark starts a line (text inside JSON may hold the same words).
                let at_line_start = |mark: &&[u8]| {
                    before.ends_with(mark)
                        && before
                            .get(..before.len().saturating_sub(mark.len()))
                            .is_some_and(|b| b.is_empty() || b.ends_with(b"\n"))
                };
                marks.iter().any(at_line_start)
                    && (!responses
                        || [&b"completed"[..], b"incomplete", b"failed"]
                            .iter()
                            .any(|w| after.starts_with(w)))
            })
        };
        // A mark across the boundary: the held tail and the chunk's first bytes.
        let head = chunk.get(..chunk.len().min(Self::KEEP)).unwrap_or_default();
        let mut seam = [0u8; 2 * Self::KEEP];
        let n = seam
            .iter_mut()
            .zip(self.tail.iter().chain(head))
            .map(|(slot, b)| *slot = *b)
            .count();
        if has(seam.get(..n).unwrap_or_default()) || has(chunk) {
            self.seen = true;
            return;
        }
        // Keep the last KEEP bytes of tail + chunk.
        let from_chunk = chunk.len().min(Self::KEEP);
        let from_tail = Self::KEEP.saturating_sub(from_chunk).min(self.tail.len());
        let tail_start = self.tail.len().saturating_sub(from_tail);
        self.tail.drain(..tail_start);
        self.tail.extend_from_slice(
            chunk
                .get(chunk.len().saturating_sub(from_chunk)..)
                .unwrap_or_default(),
        );
    }

    fn seen(&self) -> bool {
        self.seen
    }
}

/// `a` then `b`, copied only when both hold bytes.
fn join(a: Bytes, b: Bytes) -> Bytes {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => [a, b].concat().into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::{DoneWatch, End};

    #[test]
    fn done_is_found_wherever_the_chunks_split() {
        let stream = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        for size in 1..stream.len() {
            let mut watch = DoneWatch::default();
            for piece in stream.chunks(size) {
                watch.observe(piece);
            }
            assert!(watch.seen(), "{size}");
        }
        let mut watch = DoneWatch::default();
        watch.observe(b"data: {\"text\":\"[DONE\"}\n\n");
        assert!(!watch.seen());
    }

    #[test]
    fn a_messages_stream_ends_with_message_stop() {
        let stream = b"event: content_block_delta\ndata: {\"delta\":{\"text\":\"message_stop\"}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for size in 1..stream.len() {
            let mut watch = DoneWatch {
                end: End::MessageStop,
                ..DoneWatch::default()
            };
            let mut seen_at = None;
            for (i, piece) in stream.chunks(size).enumerate() {
                watch.observe(piece);
                if watch.seen() && seen_at.is_none() {
                    seen_at = Some((i + 1) * size);
                }
            }
            // Not fooled by the word in the text; found on its own event line.
            assert!(seen_at.is_some_and(|at| at > 60), "{size}: {seen_at:?}");
        }
        let mut chat = DoneWatch::default();
        chat.observe(b"event: message_stop\n\n");
        assert!(!chat.seen(), "a chat stream ends with [DONE] only");
    }

    #[test]
    fn a_responses_stream_ends_with_its_last_event() {
        let stream = b"event: response.created\ndata: {}\n\nevent: response.output_text.delta\ndata: {\"delta\":\"response.completed\"}\n\nevent: response.completed\ndata: {}\n\n";
        let end = stream.len() - b"event: response.completed\ndata: {}\n\n".len();
        for size in 1..stream.len() {
            let mut watch = DoneWatch {
                end: End::ResponseDone,
                ..DoneWatch::default()
            };
            let mut seen_at = None;
            for (i, piece) in stream.chunks(size).enumerate() {
                watch.observe(piece);
                if watch.seen() && seen_at.is_none() {
                    seen_at = Some((i + 1) * size);
                }
            }
            assert!(seen_at.is_some_and(|at| at > end), "{size}: {seen_at:?}");
        }
        for last in ["response.incomplete", "response.failed"] {
            let mut watch = DoneWatch {
                end: End::ResponseDone,
                ..DoneWatch::default()
            };
            watch.observe(format!("event: {last}\ndata: {{}}\n\n").as_bytes());
            assert!(watch.seen(), "{last}");
        }
    }
}
