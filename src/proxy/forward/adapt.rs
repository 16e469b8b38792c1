//! A provider that speaks another API than chat completions (`api: anthropic`) answering a
//! request that was translated for it: its answer is made a chat answer before anything else
//! sees it, so usage, the cache, the strip and a Responses or Messages client's own
//! translation all work on chat completions as they do for every other provider.
//!
//! - a stream: the Messages events → chat chunks (`translate::messages_provider`), event by
//!   event, ending with the usage chunk and `data: [DONE]`;
//! - a whole answer (or an error): kept until it parses, then sent as a chat completion (or an
//!   OpenAI-shaped error) in one piece.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::translate::{data_of, event_end};
use crate::translate::messages_provider::{answer, error, ChunkTranslator};

/// Most bytes a whole answer, or one stream event, may hold while it is kept.
const MAX_KEPT: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Stream,
    /// A whole answer with this status.
    Whole(u16),
}

pub struct FromMessages {
    mode: Mode,
    chunks: ChunkTranslator,
    pending: BytesMut,
    /// How much of `pending` is known to hold no event end.
    scanned: usize,
    /// A whole answer was sent (or given up on): nothing more comes of it.
    sent: bool,
    /// The chat answer's `created`.
    created: u64,
}

impl FromMessages {
    pub fn new() -> FromMessages {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        FromMessages {
            mode: Mode::Stream,
            chunks: ChunkTranslator::new(now),
            pending: BytesMut::new(),
            scanned: 0,
            sent: false,
            created: now,
        }
    }

    /// The answer is committed with this status and framing.
    pub fn commit(&mut self, status: u16, sse: bool) {
        self.mode = if sse && status < 300 {
            Mode::Stream
        } else {
            Mode::Whole(status)
        };
    }

    /// The chat answer's bytes for one chunk of the provider's (empty while an event or the
    /// whole answer is incomplete).
    pub fn filter(&mut self, chunk: &[u8]) -> Bytes {
        if self.pending.len().saturating_add(chunk.len()) > MAX_KEPT {
            // Past the bound: what is kept goes on as it is (a client gets a broken answer,
            // not an unbounded buffer).
            self.pending.extend_from_slice(chunk);
            self.sent = true;
            return self.pending.split().freeze();
        }
        self.pending.extend_from_slice(chunk);
        match self.mode {
            Mode::Whole(status) => self.whole(status, false),
            Mode::Stream => {
                let mut out = Vec::new();
                while let Some(end) = event_end(&self.pending, self.scanned) {
                    let event = self.pending.split_to(end);
                    self.scanned = 0;
                    self.event(&event, &mut out);
                }
                self.scanned = self.pending.len().saturating_sub(3);
                Bytes::from(out)
            }
        }
    }

    /// What is left once the provider's answer ended: a whole answer that never parsed, as it
    /// came (the pipeline reports it as an invalid answer).
    pub fn end(&mut self) -> Bytes {
        match self.mode {
            Mode::Whole(status) => self.whole(status, true),
            Mode::Stream => Bytes::new(),
        }
    }

    /// A whole answer, once it parses (or at the end, whatever it is).
    fn whole(&mut self, status: u16, at_end: bool) -> Bytes {
        if self.sent || self.pending.is_empty() {
            return Bytes::new();
        }
        // Parsed only when it may be complete: a JSON object ends with `}`.
        let may_be_whole = self.pending.trim_ascii_end().ends_with(b"}");
        let parsed = if may_be_whole || at_end {
            serde_json::from_slice::<Value>(&self.pending).ok()
        } else {
            None
        };
        let converted = match parsed {
            Some(v) if status < 300 => answer(&v, self.created),
            Some(_) => error(status, &self.pending),
            None if at_end && status >= 300 => error(status, &self.pending),
            None if at_end => {
                self.sent = true;
                return self.pending.split().freeze();
            }
            None => return Bytes::new(),
        };
        self.sent = true;
        self.pending.clear();
        Bytes::from(serde_json::to_vec(&converted).unwrap_or_default())
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let data = data_of(event);
        if data.is_empty() {
            return;
        }
        let converted = match serde_json::from_slice::<Value>(&data) {
            Ok(v) => self.chunks.event(&v),
            Err(_) => self
                .chunks
                .event(&serde_json::json!({"type": "error", "error": {
                "type": "api_error", "message": "the provider sent an event that is not JSON"}})),
        };
        for chunk in converted.chunks {
            out.extend_from_slice(b"data: ");
            let _ = serde_json::to_writer(&mut *out, &chunk);
            out.extend_from_slice(b"\n\n");
        }
        if converted.done {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    fn datas(bytes: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    #[test]
    fn a_messages_stream_becomes_a_chat_stream_wherever_it_splits() {
        let mut whole = FromMessages::new();
        whole.commit(200, true);
        let expected = datas(&whole.filter(STREAM.as_bytes()));
        assert_eq!(expected.len(), 5, "{expected:?}");
        assert_eq!(expected.last().unwrap(), "[DONE]");
        let usage: Value = serde_json::from_str(&expected[3]).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 5);
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        for size in [1, 2, 3, 7, 50] {
            let mut a = FromMessages::new();
            a.commit(200, true);
            let mut out = Vec::new();
            for piece in STREAM.as_bytes().chunks(size) {
                out.extend_from_slice(&a.filter(piece));
            }
            // The `created` stamps may differ by a second between two runs: compare types.
            assert_eq!(datas(&out).len(), expected.len(), "{size}");
        }
    }

    #[test]
    fn a_whole_answer_or_error_is_sent_once_it_parses() {
        let mut a = FromMessages::new();
        a.commit(200, false);
        assert!(a
            .filter(br#"{"id":"msg_1","content":[{"type":"text","text":"a}"}"#)
            .is_empty());
        let out = a
            .filter(br#"],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":1}}"#);
        let chat: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(chat["choices"][0]["message"]["content"], "a}");
        assert_eq!(chat["usage"]["total_tokens"], 4);
        assert!(a.end().is_empty());

        let mut a = FromMessages::new();
        a.commit(429, false);
        let out =
            a.filter(br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#);
        let e: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(e["error"]["message"], "slow");

        // Not JSON: passed on as it came, at the end.
        let mut a = FromMessages::new();
        a.commit(502, false);
        assert!(a.filter(b"<html>bad gateway").is_empty());
        let e: Value = serde_json::from_slice(&a.end()).unwrap();
        assert_eq!(e["error"]["message"], "<html>bad gateway");
    }
}
