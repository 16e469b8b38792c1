//! Reading token usage off a response as it streams past, without holding the stream back.
//!
//! Token budgets reserve an estimate before forwarding and settle with what the provider
//! reports: `usage` in a JSON body, or in the final SSE chunk (asked for with
//! `stream_options.include_usage`). Bounded: a JSON body is kept only up to `JSON_LIMIT` for
//! the final parse, an SSE line only up to `LINE_LIMIT`; past that, usage is "unknown" and the
//! estimate stands.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;

const JSON_LIMIT: usize = 8 << 20;
const LINE_LIMIT: usize = 1 << 20;

/// A body or event with usage: OpenAI's at the top (`usage`), an Anthropic Messages stream's
/// `message_start` (in its `message`), or a Responses stream's last event (in its
/// `response`).
#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    message: Option<Nested>,
    #[serde(default)]
    response: Option<Nested>,
}

#[derive(Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<Usage>,
}

impl WithUsage {
    fn usage(self) -> Option<Usage> {
        self.usage
            .or(self.message.and_then(|m| m.usage))
            .or(self.response.and_then(|r| r.usage))
    }
}

/// Usage in OpenAI's terms (`prompt_tokens`, `completion_tokens`) or Anthropic's
/// (`input_tokens` without the cache's, `output_tokens`).
#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    /// OpenAI chat's `cached_tokens`. (Fields of their own, not aliases: an answer that
    /// carries both names must not lose its usage to a duplicate-field error.)
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    /// The Responses API's `cached_tokens`.
    #[serde(default)]
    input_tokens_details: Option<Details>,
    /// OpenAI chat's `reasoning_tokens`.
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    /// The Responses API's `reasoning_tokens`.
    #[serde(default)]
    output_tokens_details: Option<Details>,
}

/// The parts of a usage count that are priced apart.
#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// What a response reported it used, as prices need it: prompt tokens (of which `cached` were
/// read from the provider's prompt cache) and completion tokens (of which `reasoning` were
/// the model's hidden reasoning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageReport {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}

impl Usage {
    fn prompt(&self) -> Option<u64> {
        self.prompt_tokens.or_else(|| {
            self.input_tokens.map(|i| {
                i.saturating_add(self.cache_read_input_tokens.unwrap_or(0))
                    .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            })
        })
    }

    fn completion(&self) -> Option<u64> {
        self.completion_tokens.or(self.output_tokens)
    }

    fn split(&self) -> Option<(u64, u64)> {
        match (self.prompt(), self.completion()) {
            (None, None) => None,
            (p, c) => Some((p.unwrap_or(0), c.unwrap_or(0))),
        }
    }

    fn total(&self) -> Option<u64> {
        self.total_tokens
            .or(self.split().map(|(p, c)| p.saturating_add(c)))
    }

    /// (cached prompt tokens, reasoning tokens), as reported.
    fn detail(&self) -> (Option<u64>, Option<u64>) {
        let cached = [&self.prompt_tokens_details, &self.input_tokens_details]
            .into_iter()
            .find_map(|d| d.as_ref()?.cached_tokens)
            .or(self.cache_read_input_tokens);
        let reasoning = [&self.completion_tokens_details, &self.output_tokens_details]
            .into_iter()
            .find_map(|d| d.as_ref()?.reasoning_tokens);
        (cached, reasoning)
    }
}

/// The usage of a whole JSON answer: walked (see [`scan_usage`]), else parsed whole.
fn json_usage(body: &[u8]) -> Option<Usage> {
    match scan_usage(body) {
        Some(found) => found,
        // Not a plain object (or something the scan leaves to serde): parsed whole.
        None => serde_json::from_slice::<WithUsage>(body)
            .ok()
            .and_then(WithUsage::usage),
    }
}

/// Watches one response body for its token usage.
pub struct UsageTap {
    sse: bool,
    buf: Vec<u8>,
    total: Option<u64>,
    /// (prompt, completion) when the provider reported them.
    split: Option<(u64, u64)>,
    /// (cached prompt, reasoning) tokens, when the provider reported them.
    detail: (Option<u64>, Option<u64>),
    overflow: bool,
    /// The whole JSON answer was read before it streamed past ([`UsageTap::whole`]): its
    /// chunks are counted, not kept and parsed again.
    whole_read: bool,
    /// Stream events seen (each carries about one token), or body bytes for JSON: what
    /// [`UsageTap::estimate`] counts when no usage arrives.
    events: u64,
    bytes: u64,
}

impl UsageTap {
    pub fn new(sse: bool) -> UsageTap {
        UsageTap {
            sse,
            buf: Vec::new(),
            total: None,
            split: None,
            detail: (None, None),
            overflow: false,
            whole_read: false,
            events: 0,
            bytes: 0,
        }
    }

    /// Completion tokens estimated from what streamed past, for an answer whose usage never
    /// arrived (a client that left mid-stream, a provider that reports none): one per stream
    /// event (providers send about a token per event), or a token per four bytes of JSON.
    pub fn estimate(&self) -> u64 {
        if self.sse {
            self.events
        } else {
            self.bytes.div_ceil(4)
        }
    }

    /// Sees one chunk of the body, in order.
    pub fn observe(&mut self, chunk: &[u8]) {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        if self.overflow || self.whole_read {
            return;
        }
        if !self.sse {
            if self.buf.len().saturating_add(chunk.len()) > JSON_LIMIT {
                self.overflow = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        // A chunk without a line end only extends the pending line: no rescan of what is
        // buffered (a provider sending a long line in tiny pieces must not cost quadratic time).
        let Some(first_nl) = memchr::memchr(b'\n', chunk) else {
            if self.buf.len().saturating_add(chunk.len()) > LINE_LIMIT {
                self.buf.clear();
            } else {
                self.buf.extend_from_slice(chunk);
            }
            return;
        };
        // Whole lines are read where they lie in the chunk; only a line split across chunks
        // is copied (its start, held in `buf`, and then its end).
        let mut rest = chunk;
        if !self.buf.is_empty() {
            let (end, after) = chunk.split_at(first_nl.saturating_add(1).min(chunk.len()));
            let mut line = std::mem::take(&mut self.buf);
            line.extend_from_slice(end);
            self.line(line.strip_suffix(b"\n").unwrap_or_default());
            line.clear();
            self.buf = line;
            rest = after;
        }
        let mut start = 0usize;
        for nl in memchr::memchr_iter(b'\n', rest) {
            self.line(rest.get(start..nl).unwrap_or_default());
            start = nl.saturating_add(1);
        }
        let unfinished = rest.get(start..).unwrap_or_default();
        if unfinished.len() <= LINE_LIMIT {
            self.buf.extend_from_slice(unfinished);
        }
    }

    /// One whole SSE line (without its `\n`).
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"data:") && !line.ends_with(b"[DONE]") {
            self.events = self.events.saturating_add(1);
        }
        if let Some(usage) = sse_usage(line) {
            // A Messages stream reports in two events (input at the start, output at the
            // end): what one leaves out, the one before said.
            let before = self.split;
            let prompt = usage.prompt().or(before.map(|(p, _)| p));
            let completion = usage.completion().or(before.map(|(_, c)| c));
            self.split = match (prompt, completion) {
                (None, None) => None,
                (p, c) => Some((p.unwrap_or(0), c.unwrap_or(0))),
            };
            self.total = usage
                .total_tokens
                .or(self.split.map(|(p, c)| p.saturating_add(c)));
            let (cached, reasoning) = usage.detail();
            self.detail = (cached.or(self.detail.0), reasoning.or(self.detail.1));
        }
    }

    /// Total tokens the response reported, if it did.
    pub fn total_tokens(&mut self) -> Option<u64> {
        self.parse_json();
        self.total
    }

    /// (prompt, completion) tokens the response reported, if it did.
    pub fn split(&mut self) -> Option<(u64, u64)> {
        self.parse_json();
        self.split
    }

    /// The usage the response reported, with its priced-apart parts, if it did.
    pub fn report(&mut self) -> Option<UsageReport> {
        let (prompt, completion) = self.split()?;
        Some(UsageReport {
            prompt,
            completion,
            cached: self.detail.0.unwrap_or(0).min(prompt),
            reasoning: self.detail.1.unwrap_or(0).min(completion),
        })
    }

    /// Reads the usage of a whole JSON answer already here (read to its end before its head
    /// was written), once: its chunks then only count as they stream past.
    pub fn whole(&mut self, body: &[u8]) {
        if self.sse {
            return;
        }
        self.whole_read = true;
        self.buf = Vec::new();
        self.take(json_usage(body));
    }

    fn parse_json(&mut self) {
        if !self.sse && !self.overflow && self.total.is_none() && !self.buf.is_empty() {
            let usage = json_usage(&self.buf);
            self.buf = Vec::new();
            self.take(usage);
        }
    }

    fn take(&mut self, usage: Option<Usage>) {
        if let Some(u) = usage {
            self.total = u.total();
            self.split = u.split();
            self.detail = u.detail();
        }
    }
}

/// Removes the usage-only chunk (`"choices": []` with `usage`) from a stream whose client did
/// not ask for it: Lumen asked the provider for it (for token budgets and usage accounting),
/// so the client sees exactly the stream it would have seen without Lumen.
///
/// Works on whole SSE events: complete events pass at once, an event split across chunks is
/// held only until its blank line arrives.
#[derive(Default)]
pub struct UsageStrip {
    partial: bytes::BytesMut,
}

impl UsageStrip {
    /// What of `chunk` goes to the client now (possibly nothing).
    pub fn filter(&mut self, chunk: bytes::Bytes) -> bytes::Bytes {
        if !self.partial.is_empty() && !ends_an_event(&self.partial, &chunk) {
            // Still inside the held event: append only, no rescan of what is held (a provider
            // sending a long event in tiny pieces must not cost quadratic time).
            self.partial.extend_from_slice(&chunk);
            if self.partial.len() > LINE_LIMIT {
                return self.partial.split().freeze();
            }
            return bytes::Bytes::new();
        }
        let data: bytes::Bytes = if self.partial.is_empty() {
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        let mut out: Option<bytes::BytesMut> = None;
        // `data[..start]` is whole events; `data[kept_to..start]` is not yet copied to `out`.
        // Both only ever move to the end of an event found in `data`, so the ranges are valid.
        let mut start = 0;
        let mut kept_to = 0;
        while let Some((event, end)) = next_event(&data, start) {
            if is_usage_only(event) {
                let buf = out.get_or_insert_with(bytes::BytesMut::new);
                buf.extend_from_slice(data.get(kept_to..start).unwrap_or_default());
                kept_to = end;
            }
            start = end;
        }
        let unfinished = data.get(start..).unwrap_or_default();
        // An unfinished event waits for its end, up to a line's worth: a provider that never
        // ends its event must not grow this buffer without bound (it is passed on as is).
        if unfinished.len() > LINE_LIMIT {
            let mut buf = out.unwrap_or_default();
            buf.extend_from_slice(data.get(kept_to..).unwrap_or_default());
            return buf.freeze();
        }
        self.partial.extend_from_slice(unfinished);
        match out {
            None => data.slice(..start.min(data.len())),
            Some(mut buf) => {
                buf.extend_from_slice(data.get(kept_to..start).unwrap_or_default());
                buf.freeze()
            }
        }
    }

    /// Whatever is left when the stream ends (an event without its blank line).
    pub fn finish(&mut self) -> bytes::Bytes {
        self.partial.split().freeze()
    }
}

/// Whether `chunk`, following `held` (an event without its end so far), completes an event:
/// an event end may start in the last two bytes held.
fn ends_an_event(held: &[u8], chunk: &[u8]) -> bool {
    if event_len(chunk).is_some() {
        return true;
    }
    // An end across the seam: at most two bytes held and two of the chunk (`\n` `\r\n`).
    let tail = held.get(held.len().saturating_sub(2)..).unwrap_or_default();
    let head = chunk.get(..chunk.len().min(2)).unwrap_or_default();
    let mut seam = [0u8; 4];
    let n = seam
        .iter_mut()
        .zip(tail.iter().chain(head))
        .map(|(slot, b)| *slot = *b)
        .count();
    event_len(seam.get(..n).unwrap_or_default()).is_some()
}

/// The first complete event in `data[from..]` and where it ends in `data`, if there is one.
fn next_event(data: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = data.get(from..)?;
    let len = event_len(rest)?;
    Some((rest.get(..len)?, from.checked_add(len)?))
}

/// Length of the first complete event in `data` (through its blank line), if there is one.
fn event_len(data: &[u8]) -> Option<usize> {
    // The first line end followed by `\n` or `\r\n` ends the event.
    memchr::memchr_iter(b'\n', data).find_map(|nl| match data.get(nl..)? {
        [b'\n', b'\n', ..] => nl.checked_add(2),
        [b'\n', b'\r', b'\n', ..] => nl.checked_add(3),
        _ => None,
    })
}

/// The usage of a whole JSON answer, found by walking its top-level object and parsing only
/// the members that can hold it (`usage`, `message`, `response`; see [`WithUsage`]): the rest
/// (choices, their text) is skipped by its brackets and quotes, not parsed. That was most of
/// a plain request's JSON work after its own parse. For a valid JSON answer it reads what a
/// whole parse reads; the skipped members are delimited, not validated (nor is anything after
/// the object's end), so a malformed one does not hide the usage beside it. `None`: not an
/// object this walk reads with certainty (a key with an escape, a member twice, a bracket out
/// of place), for the caller to parse whole.
fn scan_usage(body: &[u8]) -> Option<Option<Usage>> {
    let mut at = skip_ws(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_ws(body, at.checked_add(1)?);
    let mut found = WithUsage {
        usage: None,
        message: None,
        response: None,
    };
    let mut seen = [false; 3];
    if body.get(at) == Some(&b'}') {
        return Some(None);
    }
    loop {
        // A key: a string without escapes (one with any goes to the whole parse).
        if body.get(at) != Some(&b'"') {
            return None;
        }
        let key_start = at.checked_add(1)?;
        let key_len = memchr::memchr2(b'"', b'\\', body.get(key_start..)?)?;
        let key_end = key_start.checked_add(key_len)?;
        if body.get(key_end) != Some(&b'"') {
            return None;
        }
        let key = body.get(key_start..key_end)?;
        at = skip_ws(body, key_end.checked_add(1)?);
        if body.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(body, at.checked_add(1)?);
        let slot = match key {
            b"usage" => Some(0),
            b"message" => Some(1),
            b"response" => Some(2),
            _ => None,
        };
        at = match slot {
            Some(i) => {
                // serde rejects a member twice: so does the walk (the whole parse decides).
                if std::mem::replace(seen.get_mut(i)?, true) {
                    return None;
                }
                // One value, and where it ended (a stream of values reports its offset).
                let rest = body.get(at..)?;
                let used = match i {
                    0 => {
                        let mut one = serde_json::Deserializer::from_slice(rest).into_iter();
                        found.usage = one.next()?.ok()?;
                        one.byte_offset()
                    }
                    _ => {
                        let mut one = serde_json::Deserializer::from_slice(rest).into_iter();
                        let nested: Option<Nested> = one.next()?.ok()?;
                        if i == 1 {
                            found.message = nested;
                        } else {
                            found.response = nested;
                        }
                        one.byte_offset()
                    }
                };
                at.checked_add(used)?
            }
            None => skip_value(body, at)?,
        };
        at = skip_ws(body, at);
        match body.get(at) {
            Some(b',') => at = skip_ws(body, at.checked_add(1)?),
            Some(b'}') => return Some(found.usage()),
            _ => return None,
        }
    }
}

/// Past JSON's whitespace (space, tab, line feed, carriage return: not form feed).
fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while body
        .get(at)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at = at.saturating_add(1);
    }
    at
}

/// Where the string starting at `at` (its opening quote) ends, just past its closing quote.
fn skip_string(body: &[u8], at: usize) -> Option<usize> {
    let mut i = at.checked_add(1)?;
    loop {
        let n = memchr::memchr2(b'"', b'\\', body.get(i..)?)?;
        i = i.checked_add(n)?;
        match body.get(i)? {
            // An escape: skip it and the character it escapes.
            b'\\' => i = i.checked_add(2)?,
            _ => return i.checked_add(1),
        }
    }
}

/// Where the JSON value starting at `at` ends (not validated, only delimited: a string by its
/// quotes, an object or array by its brackets, a number or literal by what follows it).
fn skip_value(body: &[u8], at: usize) -> Option<usize> {
    match body.get(at)? {
        b'"' => skip_string(body, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match body.get(i)? {
                    b'"' => {
                        i = skip_string(body, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth = depth.checked_add(1)?,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return i.checked_add(1);
                        }
                    }
                    _ => {}
                }
                i = i.checked_add(1)?;
            }
        }
        _ => {
            let rest = body.get(at..)?;
            let len = rest
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            (len > 0).then(|| at.saturating_add(len))
        }
    }
}

/// Whether `bytes` holds the JSON key `"usage"` (SIMD search: most chunks do not).
fn mentions_usage(bytes: &[u8]) -> bool {
    // Built once: `memmem::find` builds a searcher on every call.
    static USAGE: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
    USAGE.find(bytes).is_some()
}

fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    if !mentions_usage(event) {
        return false;
    }
    event.split(|b| *b == b'\n').any(|line| {
        line.strip_prefix(b"data:")
            .and_then(|d| serde_json::from_slice::<Chunk>(d.trim_ascii()).ok())
            .is_some_and(|c| c.usage.is_some() && c.choices.is_some_and(|ch| ch.is_empty()))
    })
}

fn sse_usage(line: &[u8]) -> Option<Usage> {
    let data = line.strip_prefix(b"data:")?;
    // Cheap filter first: most chunks carry no usage.
    if !mentions_usage(data) {
        return None;
    }
    serde_json::from_slice::<WithUsage>(data.trim_ascii())
        .ok()?
        .usage()
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    /// The parts priced apart are read in every API's names, streamed or whole, and an answer
    /// that carries both names keeps its usage.
    #[test]
    fn cached_and_reasoning_tokens_are_read_in_each_api_s_names() {
        let whole = |body: &str| {
            let mut tap = UsageTap::new(false);
            tap.whole(body.as_bytes());
            // What streams past afterwards is counted, not parsed again.
            tap.observe(b"{\"usage\":{\"prompt_tokens\":1}}");
            tap.report().unwrap()
        };
        let chat = whole(
            r#"{"usage":{"prompt_tokens":100,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":40},"completion_tokens_details":{"reasoning_tokens":30}}}"#,
        );
        assert_eq!(
            (chat.prompt, chat.completion, chat.cached, chat.reasoning),
            (100, 50, 40, 30)
        );
        let responses = whole(
            r#"{"response":{"usage":{"input_tokens":100,"output_tokens":50,"input_tokens_details":{"cached_tokens":10},"output_tokens_details":{"reasoning_tokens":5}}}}"#,
        );
        assert_eq!((responses.cached, responses.reasoning), (10, 5));
        let both = whole(
            r#"{"usage":{"prompt_tokens":9,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":4},"input_tokens_details":{"cached_tokens":4}}}"#,
        );
        assert_eq!((both.prompt, both.cached), (9, 4));
        // Anthropic: cache reads are the cached part of the prompt; above the prompt, capped.
        let messages =
            whole(r#"{"usage":{"input_tokens":5,"output_tokens":2,"cache_read_input_tokens":20}}"#);
        assert_eq!((messages.prompt, messages.cached), (25, 20));
        let mut tap = UsageTap::new(true);
        tap.observe(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":2},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n");
        let r = tap.report().unwrap();
        assert_eq!(
            (r.prompt, r.completion, r.cached, r.reasoning),
            (8, 3, 2, 1)
        );
    }
    /// The walk over a whole answer reads the same usage as a whole parse, wherever the
    /// member lies and whatever the strings around it hold; what it cannot read with
    /// certainty it leaves to the whole parse.
    #[test]
    fn the_scan_of_a_json_answer_reads_what_a_whole_parse_reads() {
        let bodies: &[&str] = &[
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4,"total_tokens":11}}"#,
            r#" { "usage" : { "prompt_tokens" : 1 } , "id" : "x" } "#,
            r#"{"choices":[{"message":{"content":"say \"usage\":{\"total_tokens\":99} and }]{["}}],"usage":{"total_tokens":3}}"#,
            r#"{"choices":[{"message":{"content":"a\\","usage":{"total_tokens":5}}}],"x":1}"#,
            r#"{"x":{"usage":{"total_tokens":8}},"y":[{"usage":{"total_tokens":9}}]}"#,
            r#"{"message":{"usage":{"input_tokens":4,"output_tokens":2}}}"#,
            r#"{"response":{"id":"r","usage":{"input_tokens":1}},"n":-1.5e3,"t":true,"z":null}"#,
            r#"{"usage":null,"message":{"usage":{"output_tokens":2}}}"#,
            r#"{"usage":{"total_tokens":"many"}}"#,
            r#"{"usage":{"total_tokens":1},"usage":{"total_tokens":2}}"#,
            r#"{"usa\u0067e":{"total_tokens":6}}"#,
            r#"{}"#,
            r#"[{"usage":{"total_tokens":1}}]"#,
            r#"{"usage":{"total_tokens":1}"#,
            r#"{"a":[1,2,{"b":"]"}],"usage":{"prompt_tokens":2,"completion_tokens":2}}"#,
            r#"not json"#,
        ];
        for body in bodies {
            let whole = serde_json::from_slice::<WithUsage>(body.as_bytes())
                .ok()
                .and_then(WithUsage::usage)
                .map(|u| (u.total(), u.split()));
            let mut tap = UsageTap::new(false);
            tap.observe(body.as_bytes());
            assert_eq!(
                (tap.total_tokens(), tap.split()),
                whole.map_or((None, None), |w| w),
                "{body}"
            );
        }
        // The walk itself answers the plain shapes, and defers the rest.
        assert!(scan_usage(bodies[0].as_bytes()).is_some());
        assert!(scan_usage(bodies[2].as_bytes()).is_some());
        assert!(scan_usage(bodies[9].as_bytes()).is_none(), "a member twice");
        assert!(
            scan_usage(bodies[10].as_bytes()).is_none(),
            "an escaped key"
        );
    }

    #[test]
    fn finds_usage_in_a_json_body_split_anywhere() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4,"total_tokens":11}}"#;
        let mut tap = UsageTap::new(false);
        for piece in body.chunks(5) {
            tap.observe(piece);
        }
        assert_eq!(tap.total_tokens(), Some(11));
    }

    #[test]
    fn finds_usage_in_the_last_sse_chunk_across_chunk_boundaries() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let mut tap = UsageTap::new(true);
        for piece in stream.chunks(9) {
            tap.observe(piece);
        }
        assert_eq!(tap.total_tokens(), Some(5));
        assert_eq!(tap.split(), Some((3, 2)));
        let mut none = UsageTap::new(true);
        none.observe(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(none.total_tokens(), None);
    }

    /// Anthropic's Messages API: a whole `message`'s usage (cache reads and writes count as
    /// prompt tokens), and a stream's, given at its start (input) and its end (output).
    #[test]
    fn anthropic_usage_is_read_in_openai_terms() {
        let mut json = UsageTap::new(false);
        json.observe(br#"{"id":"msg_1","usage":{"input_tokens":7,"output_tokens":4,"cache_read_input_tokens":3}}"#);
        assert_eq!(json.split(), Some((10, 4)));
        assert_eq!(json.total_tokens(), Some(14));
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
        );
        let mut tap = UsageTap::new(true);
        tap.observe(stream.as_bytes());
        assert_eq!(tap.split(), Some((12, 9)));
        assert_eq!(tap.total_tokens(), Some(21));
        // A Responses stream: in its last event's response.
        let mut tap = UsageTap::new(true);
        tap.observe(b"event: response.created\ndata: {\"response\":{\"usage\":null}}\n\nevent: response.completed\ndata: {\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":3,\"total_tokens\":8}}}\n\n");
        assert_eq!(tap.split(), Some((5, 3)));
        assert_eq!(tap.total_tokens(), Some(8));
    }

    /// Lines are read in place and only a line split across chunks is copied: the usage and
    /// the event count come out the same for every split, with `\n` or `\r\n` line ends.
    #[test]
    fn every_split_reads_the_same_usage_and_events() {
        for nl in ["\n", "\r\n"] {
            let stream = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}{nl}{nl}: keep-alive{nl}{nl}data: {{\"choices\":[{{\"delta\":{{\"content\":\"b\"}}}}]}}{nl}{nl}data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":4,\"completion_tokens\":2}}}}{nl}{nl}data: [DONE]{nl}{nl}"
            );
            for size in 1..=stream.len() {
                let mut tap = UsageTap::new(true);
                for piece in stream.as_bytes().chunks(size) {
                    tap.observe(piece);
                }
                assert_eq!(tap.split(), Some((4, 2)), "pieces of {size} ({nl:?})");
                assert_eq!(tap.estimate(), 3, "pieces of {size} ({nl:?})");
            }
        }
    }

    #[test]
    fn a_stream_without_usage_is_estimated_by_its_events() {
        let mut tap = UsageTap::new(true);
        for _ in 0..5 {
            tap.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        }
        tap.observe(b"data: [DONE]\n\n");
        assert_eq!(tap.total_tokens(), None);
        assert_eq!(tap.estimate(), 5);
    }

    #[test]
    fn a_long_event_in_tiny_pieces_costs_linear_time() {
        // 512 KiB in 1-byte pieces: quadratic rescans would take minutes.
        let started = std::time::Instant::now();
        let mut strip = UsageStrip::default();
        let mut tap = UsageTap::new(true);
        let mut out = 0;
        out += strip
            .filter(bytes::Bytes::from_static(b"data: {\"x\":\""))
            .len();
        tap.observe(b"data: {\"x\":\"");
        for _ in 0..512 * 1024 {
            out += strip.filter(bytes::Bytes::from_static(b"a")).len();
            tap.observe(b"a");
        }
        out += strip.filter(bytes::Bytes::from_static(b"\"}\n\n")).len();
        tap.observe(b"\"}\n\n");
        assert_eq!(out, 512 * 1024 + 16);
        assert_eq!(tap.estimate(), 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn an_endless_event_is_passed_on_not_held() {
        let mut strip = UsageStrip::default();
        let big = bytes::Bytes::from(vec![b'x'; LINE_LIMIT + 10]);
        assert_eq!(strip.filter(big.clone()).len(), big.len());
        assert!(strip.finish().is_empty());
    }

    #[test]
    fn strips_only_the_usage_chunk_wherever_the_chunks_split() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\n\n";
        let want = b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\ndata: [DONE]\n\n";
        for size in [1, 2, 5, 9, 64, stream.len()] {
            let mut strip = UsageStrip::default();
            let mut out = Vec::new();
            for piece in stream.chunks(size) {
                out.extend_from_slice(&strip.filter(bytes::Bytes::copy_from_slice(piece)));
            }
            out.extend_from_slice(&strip.finish());
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(want),
                "{size}"
            );
        }
        // Complete events pass at once, untouched and uncopied.
        let mut strip = UsageStrip::default();
        let whole = bytes::Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        assert_eq!(strip.filter(whole.clone()), whole);
    }
}
