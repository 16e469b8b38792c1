//! A translated stream on its way to the client: the provider's chat completion chunks in,
//! the client's Responses events out (`crate::translate::responses`), event by event as they
//! complete. A provider's error event becomes `response.failed`; `[DONE]` becomes
//! `response.completed` (or `response.incomplete`).

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde_json::Value;

use std::sync::LazyLock;

use crate::translate::responses::{write_sse, Event, StreamTranslator};

/// Most bytes one provider event may hold before the stream is failed: the translation needs
/// whole events, and a provider that never ends one must not grow the buffer without bound.
const MAX_EVENT: usize = 4 << 20;

/// Most bytes of a provider's stream translated: the translation keeps the answer's text and
/// arguments for its closing events, so an endless stream must not grow them without bound
/// (the limit a whole translated answer has too).
const MAX_STREAM: usize = 64 << 20;

pub struct ResponsesStream {
    translator: StreamTranslator,
    /// Bytes of an event not yet complete.
    pending: BytesMut,
    /// How much of `pending` is known to hold no event end (not scanned again).
    scanned: usize,
    /// Bytes of the provider's stream so far, and the most translated.
    seen: usize,
    limit: usize,
    events: Vec<Event>,
}

impl ResponsesStream {
    pub fn new(translator: StreamTranslator) -> ResponsesStream {
        ResponsesStream {
            translator,
            pending: BytesMut::new(),
            scanned: 0,
            seen: 0,
            limit: MAX_STREAM,
            events: Vec::new(),
        }
    }

    /// The client's bytes for one provider chunk (empty while an event is incomplete).
    pub fn filter(&mut self, chunk: &[u8]) -> Bytes {
        if self.translator.finished() {
            return Bytes::new();
        }
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            self.pending.clear();
            self.translator.fail(
                "the provider's answer is larger than 64 MiB",
                &mut self.events,
            );
            return self.take();
        }
        self.pending.extend_from_slice(chunk);
        while let Some(end) = event_end(&self.pending, self.scanned) {
            let event = self.pending.split_to(end);
            self.scanned = 0;
            self.event(&event);
        }
        // An end marker may start in the last 3 bytes and finish in the next chunk.
        self.scanned = self.pending.len().saturating_sub(3);
        if self.pending.len() > MAX_EVENT {
            self.pending.clear();
            self.scanned = 0;
            self.translator.fail(
                "the provider sent an event larger than 4 MiB",
                &mut self.events,
            );
        }
        self.take()
    }

    /// Ends the stream with `response.failed` (nothing when it already ended).
    pub fn fail(&mut self, message: &str) -> Bytes {
        self.translator.fail(message, &mut self.events);
        self.take()
    }

    /// Whether the stream ended (completed, incomplete or failed).
    pub fn finished(&self) -> bool {
        self.translator.finished()
    }

    fn take(&mut self) -> Bytes {
        let mut out = Vec::new();
        for event in self.events.drain(..) {
            write_sse(&mut out, &event);
        }
        Bytes::from(out)
    }

    /// One whole SSE event from the provider: its `data:` lines joined.
    fn event(&mut self, event: &[u8]) {
        let mut data = Vec::new();
        for line in event.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        if data.is_empty() {
            // A comment or a keep-alive.
            return;
        }
        if data == b"[DONE]" {
            self.translator.finish(&mut self.events);
            return;
        }
        match serde_json::from_slice::<Value>(&data) {
            Ok(v) => match v.get("error") {
                Some(error) => {
                    let message = error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("the provider failed");
                    self.translator.fail(message, &mut self.events);
                }
                None => self.translator.chunk(&v, &mut self.events),
            },
            Err(_) => self.translator.fail(
                "the provider sent an event that is not JSON",
                &mut self.events,
            ),
        }
    }
}

/// Where the first complete event in `buf` ends (after its blank line), looking from `from`
/// on (what lies before holds no end). The searchers are built once: building one costs more
/// than a search (`memmem::find` builds one per call).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    static LF: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new("\n\n"));
    static CRLF: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new("\r\n\r\n"));
    let rest = buf.get(from..)?;
    let at = |i: usize, len: usize| from.saturating_add(i).saturating_add(len);
    let lf = LF.find(rest).map(|i| at(i, 2));
    let crlf = CRLF.find(rest).map(|i| at(i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::translate::responses::Meta;
    use serde_json::json;

    fn stream() -> ResponsesStream {
        let meta = Meta::new("resp_1".into(), 1, &json!({"model": "m", "input": "x"}));
        ResponsesStream::new(StreamTranslator::new(meta))
    }

    fn types(bytes: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .filter_map(|l| l.strip_prefix("event: ").map(str::to_string))
            .collect()
    }

    #[test]
    fn events_are_translated_whole_wherever_the_chunks_split() {
        let provider = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        let whole = {
            let mut s = stream();
            s.filter(provider).to_vec()
        };
        assert_eq!(
            types(&whole),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for size in 1..provider.len() {
            let mut s = stream();
            let mut out = Vec::new();
            for piece in provider.chunks(size) {
                out.extend_from_slice(&s.filter(piece));
            }
            assert_eq!(types(&out), types(&whole), "{size}");
            assert!(s.finished());
        }
    }

    /// A stream past the limit ends with `response.failed`, and nothing after it.
    #[test]
    fn a_stream_past_its_size_limit_fails() {
        let mut s = stream();
        s.limit = 1000;
        let event =
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"0123456789\"}}]}\n\n";
        let mut out = Vec::new();
        for _ in 0..100 {
            out.extend_from_slice(&s.filter(event));
        }
        let kinds = types(&out);
        assert_eq!(kinds.last().map(String::as_str), Some("response.failed"));
        assert_eq!(kinds.iter().filter(|k| *k == "response.failed").count(), 1);
        assert!(s.finished());
    }

    #[test]
    fn a_provider_error_event_or_garbage_fails_the_stream_once() {
        let mut s = stream();
        let out = s.filter(b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n");
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("event: response.failed"), "{text}");
        assert!(text.contains("overloaded"), "{text}");
        assert!(s.fail("later").is_empty(), "ended once");
        assert!(s.filter(b"data: [DONE]\n\n").is_empty());

        let mut s = stream();
        let text = String::from_utf8(s.filter(b"data: {nope\n\n").to_vec()).unwrap();
        assert!(text.contains("event: response.failed"), "{text}");
    }
}
