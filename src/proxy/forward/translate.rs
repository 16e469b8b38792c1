//! A translated stream on its way to the client: the provider's chat completion chunks in,
//! the client's events out (Responses or Messages, `crate::translate`), event by event as they
//! complete. A provider's error event becomes the API's failure event (`response.failed`, an
//! Anthropic `error`); `[DONE]` becomes its end (`response.completed`, `message_stop`). An
//! error answer (a provider's 4xx before any event) is passed on in the client's API's error
//! shape when it has its own (Anthropic's), whole.

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

use crate::translate::answer::{Answer, Stream};
use crate::translate::{write_sse, Event};

/// Most bytes one provider event may hold before the stream is failed: the translation needs
/// whole events, and a provider that never ends one must not grow the buffer without bound.
const MAX_EVENT: usize = 4 << 20;

/// Most bytes of a provider's stream translated: the translation keeps the answer's text and
/// arguments for its closing events, so an endless stream must not grow them without bound
/// (the limit a whole translated answer has too).
const MAX_STREAM: usize = 64 << 20;

/// Most bytes of a provider's error answer kept to reshape it (the message is what matters).
const MAX_ERROR: usize = 64 << 10;

/// What the stage does with the committed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not committed yet, or an answer passed on as it is.
    Off,
    /// A successful stream: translated event by event.
    Events,
    /// An error answer the client's API shapes its own way: kept, and sent reshaped at the end.
    Error(u16),
    /// A whole chat answer to a stream request (a provider that ignored `stream`): kept, and
    /// sent at its end as the events its stream would have carried (the client asked for a
    /// stream, and an SDK reading one finds no events in a JSON body).
    Whole,
}

pub struct TranslatedStream {
    answer: Answer,
    translator: Stream,
    mode: Mode,
    /// Bytes of an event not yet complete.
    pending: BytesMut,
    /// How much of `pending` is known to hold no event end (not scanned again).
    scanned: usize,
    /// Bytes of the provider's stream so far, and the most translated.
    seen: usize,
    limit: usize,
    events: Vec<Event>,
}

impl TranslatedStream {
    pub fn new(answer: Answer) -> TranslatedStream {
        TranslatedStream {
            translator: answer.stream(),
            answer,
            mode: Mode::Off,
            pending: BytesMut::new(),
            scanned: 0,
            seen: 0,
            limit: MAX_STREAM,
            events: Vec::new(),
        }
    }

    /// The answer is committed with this status and framing: whether the stage changes it
    /// (what it returns for a chunk is then all the client gets of it).
    pub fn commit(&mut self, status: u16, sse: bool) -> bool {
        self.mode = if status < 300 && sse {
            Mode::Events
        } else if status >= 300 && self.answer.error(status, b"").is_some() {
            Mode::Error(status)
        } else if status < 300 {
            Mode::Whole
        } else {
            Mode::Off
        };
        self.pending.clear();
        if self.mode == Mode::Events {
            // The stream opens at once (`response.created`, `message_start`), as the APIs'
            // own servers do: the client need not wait for the provider's first chunk, nor for
            // the rest of a batch to be translated, to see its stream begin.
            self.translator.start(&mut self.events);
        }
        self.mode != Mode::Off
    }

    /// The opening events made at the commit (empty once taken, or for another mode).
    pub fn opening(&mut self) -> Bytes {
        self.take()
    }

    /// Whether the committed answer, a whole chat answer, goes to the client as a stream of
    /// events: its head must say `text/event-stream`.
    pub fn streams_whole(&self) -> bool {
        self.mode == Mode::Whole
    }

    /// The client's bytes for one provider chunk (empty while an event is incomplete, or
    /// while an error answer is kept).
    pub fn filter(&mut self, chunk: &[u8]) -> Bytes {
        if self.mode == Mode::Off {
            return Bytes::copy_from_slice(chunk);
        }
        self.feed(chunk);
        self.take()
    }

    /// Translates what of `chunk` completes events into `events` (or keeps it, see `Mode`).
    fn feed(&mut self, chunk: &[u8]) {
        match self.mode {
            Mode::Off => return,
            Mode::Error(_) | Mode::Whole => {
                let max = if self.mode == Mode::Whole {
                    MAX_STREAM
                } else {
                    MAX_ERROR
                };
                let room = max.saturating_sub(self.pending.len());
                self.pending
                    .extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
                return;
            }
            Mode::Events => {}
        }
        if self.translator.finished() {
            return;
        }
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            self.pending.clear();
            self.translator.fail(
                "the provider's answer is larger than 64 MiB",
                &mut self.events,
            );
            return;
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
    }

    /// A kept whole chat answer, once all here, becomes the events its stream would have
    /// carried (held until [`TranslatedStream::end`]; see `translate::whole_as_chunk`): a
    /// Responses stream's completed `response` is then ready to be stored before the client
    /// has the end. A body that is not a chat answer ends the stream with the API's failure
    /// event.
    pub fn whole_arrived(&mut self) {
        if self.mode != Mode::Whole {
            return;
        }
        self.mode = Mode::Events;
        let body = std::mem::take(&mut self.pending);
        let chunk = serde_json::from_slice::<Value>(&body)
            .ok()
            .as_ref()
            .and_then(crate::translate::whole_as_chunk);
        match chunk {
            Some(chunk) => {
                self.translator.chunk(&chunk, &mut self.events);
                self.translator.finish(&mut self.events);
            }
            None => self.translator.fail(
                "the provider answered with a body that is not a chat completion",
                &mut self.events,
            ),
        }
    }

    /// What is left to send once the provider's answer ended: the events of a whole answer, a
    /// kept error answer reshaped.
    pub fn end(&mut self) -> Bytes {
        self.whole_arrived();
        if self.mode == Mode::Events {
            if !self.pending.is_empty() {
                // The provider's last event without its blank line (`data: [DONE]` and a
                // close).
                let event = self.pending.split();
                self.scanned = 0;
                self.event(&event);
            }
            return self.take();
        }
        let Mode::Error(status) = self.mode else {
            return Bytes::new();
        };
        self.mode = Mode::Off;
        let body = std::mem::take(&mut self.pending);
        self.answer
            .error(status, &body)
            .map(|error| Bytes::from(serde_json::to_vec(&error).unwrap_or_default()))
            .unwrap_or_else(|| body.freeze())
    }

    /// Ends the stream with its API's failure event (nothing when it already ended).
    pub fn fail(&mut self, message: &str) -> Bytes {
        self.translator.fail(message, &mut self.events);
        self.take()
    }

    /// The finished `response` of a Responses stream that completed, once.
    pub fn take_completed(&mut self) -> Option<Value> {
        self.translator.take_completed()
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

    /// One whole SSE event from the provider.
    fn event(&mut self, event: &[u8]) {
        let data = data_of(event);
        if data.is_empty() {
            // A comment or a keep-alive.
            return;
        }
        if data == b"[DONE]" {
            self.translator.finish(&mut self.events);
            return;
        }
        match crate::translate::chunk_of(&data) {
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

/// An SSE event's `data:` lines, joined (empty for a comment or a keep-alive).
pub(super) fn data_of(event: &[u8]) -> Vec<u8> {
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
    data
}

/// Where the first complete event in `buf` ends (after its blank line), looking from `from`
/// on (what lies before holds no end). The searchers are built once: building one costs more
/// than a search (`memmem::find` builds one per call).
pub(super) fn event_end(buf: &[u8], from: usize) -> Option<usize> {
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

    fn stream() -> TranslatedStream {
        let meta = Meta::new("resp_1".into(), 1, &json!({"model": "m", "input": "x"}));
        let mut s = TranslatedStream::new(Answer::Responses(meta));
        assert!(s.commit(200, true));
        s
    }

    fn messages() -> TranslatedStream {
        let meta = crate::translate::messages::Meta::new("msg_1".into(), &json!({"model": "m"}));
        TranslatedStream::new(Answer::Messages(meta))
    }

    /// A Messages stream of one text block, event by event.
    const ONE_TEXT_BLOCK: [&str; 7] = [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ];

    fn types(bytes: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .filter_map(|l| l.strip_prefix("event: ").map(str::to_string))
            .collect()
    }

    #[test]
    fn a_stream_opens_at_the_commit_before_any_chunk() {
        let mut s = stream();
        assert_eq!(
            types(&s.opening()),
            ["response.created", "response.in_progress"]
        );
        assert!(s.opening().is_empty(), "once");
        let mut m = messages();
        assert!(m.commit(200, true));
        assert_eq!(types(&m.opening()), ["message_start", "ping"]);
        // An error answer is not a stream: nothing opens.
        let mut e = messages();
        assert!(e.commit(400, false));
        assert!(e.opening().is_empty());
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

    /// A Messages stream: Anthropic's events, and Anthropic's `error` event for a failure.
    #[test]
    fn a_messages_stream_is_translated_and_its_errors_reshaped() {
        let mut s = messages();
        assert!(s.commit(200, true));
        let out = s.filter(
            concat!(
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                "data: [DONE]\n\n"
            )
            .as_bytes(),
        );
        assert_eq!(types(&out), ONE_TEXT_BLOCK);
        assert!(s.end().is_empty(), "nothing kept for a success");

        let mut s = messages();
        assert!(s.commit(200, true));
        let text = String::from_utf8(s.fail("cut").to_vec()).unwrap();
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let data = last.strip_prefix("event: error\ndata: ").unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(data).unwrap(),
            json!({"type": "error", "error": {"type": "api_error", "message": "cut"}})
        );

        // A provider's error answer, in pieces: kept, then sent whole in Anthropic's shape.
        let mut s = messages();
        assert!(s.commit(400, false));
        assert!(s.filter(b"{\"error\":{\"message\":\"bad ").is_empty());
        assert!(s
            .filter(b"input\",\"type\":\"invalid_request_error\"}}")
            .is_empty());
        let body: serde_json::Value = serde_json::from_slice(&s.end()).unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad input"}})
        );

        // A provider that answered a stream request with a whole JSON answer: kept, then sent
        // as the events of its stream (the client asked for one).
        let mut s = messages();
        assert!(s.commit(200, false));
        assert!(s.streams_whole());
        assert!(s
            .filter(br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"#)
            .is_empty());
        assert!(s.filter(br#""finish_reason":"length"}]}"#).is_empty());
        let events = s.end();
        assert_eq!(types(&events), ONE_TEXT_BLOCK);
        let text = String::from_utf8(events.to_vec()).unwrap();
        assert!(text.contains(r#""text":"Hi""#), "{text}");
        assert!(text.contains(r#""stop_reason":"max_tokens""#), "{text}");

        // A Responses stream answered whole: its completed response is there to be stored
        // once the answer is all here, before the client is sent its events.
        let meta = Meta::new("resp_1".into(), 1, &json!({"model": "m", "input": "x"}));
        let mut s = TranslatedStream::new(Answer::Responses(meta));
        assert!(s.commit(200, false));
        assert!(s
            .filter(br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#)
            .is_empty());
        s.whole_arrived();
        let completed = s.take_completed().unwrap();
        assert_eq!(completed["status"], "completed");
        assert_eq!(completed["output"][0]["content"][0]["text"], "Hi");
        assert_eq!(completed["usage"]["total_tokens"], 4);
        assert_eq!(types(&s.end()).last().unwrap(), "response.completed");

        // A whole answer keeps what a rendered stream would lose: a choice without `index`,
        // the matched stop sequence.
        let mut s = messages();
        assert!(s.commit(200, false));
        s.filter(br#"{"choices":[{"message":{"content":"Hi"},"finish_reason":"stop","stop_reason":"END"}]}"#);
        let text = String::from_utf8(s.end().to_vec()).unwrap();
        assert!(text.contains(r#""stop_reason":"stop_sequence""#), "{text}");
        assert!(text.contains(r#""stop_sequence":"END""#), "{text}");
        assert!(text.contains(r#""text":"Hi""#), "{text}");

        // A body that is not a chat answer ends the stream with the API's failure event.
        let mut s = messages();
        assert!(s.commit(200, false));
        assert!(s.filter(b"<html>busy</html>").is_empty());
        assert_eq!(types(&s.end()).last().unwrap(), "error");

        // A Responses client gets the provider's error as it is (the same shape).
        let meta = Meta::new("resp_1".into(), 1, &json!({"model": "m", "input": "x"}));
        let mut s = TranslatedStream::new(Answer::Responses(meta));
        assert!(!s.commit(400, false));
        assert_eq!(&s.filter(b"{}")[..], b"{}");
    }
}
