//! [`Assembler`]: an SSE stream, as it passes, into the equivalent non-stream JSON answer.
//!
//! Only a stream that ended properly (`data: [DONE]`, no `error` event, every event valid JSON
//! of the expected shape) assembles: a truncated or failed stream gives nothing (the cache never
//! stores it).
//!
//! Streamed pieces are merged the way OpenAI splits them: text fields of a delta (`content`,
//! `refusal`, and extensions such as `reasoning_content`) are concatenated, list fields are
//! extended, tool calls are merged by their `index`. A delta field that cannot be merged
//! faithfully (an object, such as the legacy `function_call` or `audio`) makes the stream
//! unusable rather than assembled incomplete.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::kind::{header_of, Kind, HEADER_FIELDS};

/// A stream that cannot be stored: malformed, errored, or with a part we cannot merge.
#[derive(Debug)]
struct Unusable;

/// One tool call of a choice, merged from its streamed pieces.
#[derive(Debug, Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    arguments: String,
}

/// One choice being assembled.
#[derive(Debug, Default)]
struct Choice {
    role: Option<String>,
    /// The concatenated text fields (`content`, `refusal`, ... or `text` for completions) and
    /// list fields of the deltas, by name.
    fields: Map<String, Value>,
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<String>,
    /// The `logprobs` lists (`content`, `refusal`, or the completion lists), concatenated.
    logprobs: Map<String, Value>,
}

/// Collects an SSE response (`data: {...}` events, `data: [DONE]`) as it streams, chunks split
/// anywhere (mid-line, mid-event; LF, CRLF or CR line ends), into the non-stream answer.
#[derive(Debug)]
pub struct Assembler {
    kind: Kind,
    /// Most SSE bytes accepted: a longer stream is not stored, and is not buffered either.
    limit: usize,
    received: usize,
    /// The line being read (without its end).
    line: Vec<u8>,
    /// The last line ended with CR: an LF first in the next chunk belongs to that line end.
    after_cr: bool,
    /// The `data` of the event being read: its `data:` lines, each followed by LF.
    data: Vec<u8>,
    /// The event being read is named `error` (`event: error`).
    error_event: bool,
    header: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
    done: bool,
    broken: bool,
}

impl Assembler {
    /// An assembler for a stream of `kind`, accepting at most `limit` bytes of SSE.
    pub fn new(kind: Kind, limit: usize) -> Assembler {
        Assembler {
            kind,
            limit,
            received: 0,
            line: Vec::new(),
            after_cr: false,
            data: Vec::new(),
            error_event: false,
            header: Map::new(),
            choices: BTreeMap::new(),
            usage: None,
            done: false,
            broken: false,
        }
    }

    /// Takes the next bytes of the stream, as they arrived.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.broken {
            return;
        }
        self.received = self.received.saturating_add(chunk.len());
        if self.received > self.limit {
            self.give_up();
            return;
        }
        let mut rest = chunk;
        while !self.broken {
            if self.after_cr {
                match rest.split_first() {
                    None => return,
                    Some((b'\n', tail)) => rest = tail,
                    Some(_) => {}
                }
                self.after_cr = false;
            }
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.line.extend_from_slice(rest);
                return;
            };
            let (head, tail) = rest.split_at(end);
            self.line.extend_from_slice(head);
            self.after_cr = tail.first() == Some(&b'\r');
            rest = tail.get(1..).unwrap_or_default();
            self.end_line();
        }
    }

    /// The equivalent non-stream JSON body, only when the stream ended properly: `[DONE]`
    /// seen, no `error` event, every event parsed, at least one choice, within the limit.
    /// Otherwise `None`: a truncated or errored stream is never cached.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        // A stream may end without the final line end or blank line: what came is complete.
        if !self.line.is_empty() {
            self.end_line();
        }
        self.dispatch();
        if self.broken || !self.done || self.choices.is_empty() {
            return None;
        }
        serde_json::to_vec(&self.answer()).ok()
    }

    /// Stops assembling for good and frees what was buffered.
    fn give_up(&mut self) {
        self.broken = true;
        self.line = Vec::new();
        self.data = Vec::new();
        self.choices = BTreeMap::new();
        self.header = Map::new();
        self.usage = None;
    }

    /// Handles the complete line in `self.line` (SSE field parsing), keeping its buffer.
    fn end_line(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        self.field(&line);
        line.clear();
        if !self.broken {
            self.line = line;
        }
    }

    /// One SSE line: a blank line ends the event; `data` and `event` fields are kept; comments
    /// (`: keep-alive`) and other fields (`id`, `retry`) carry nothing an answer needs.
    fn field(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (name, rest) = line.split_at(colon);
                let value = rest.get(1..).unwrap_or_default();
                (name, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => self.error_event = value == b"error",
            _ => {}
        }
    }

    /// Ends the event being read: `[DONE]` ends the stream, anything else must be a chunk.
    fn dispatch(&mut self) {
        let data = std::mem::take(&mut self.data);
        let error_event = std::mem::replace(&mut self.error_event, false);
        if self.done || self.broken {
            // Whatever follows `[DONE]` is not part of the answer.
            return;
        }
        if error_event {
            self.give_up();
            return;
        }
        let data = data.trim_ascii();
        if data.is_empty() {
            return;
        }
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let merged = match serde_json::from_slice::<Value>(data) {
            Ok(Value::Object(chunk)) => self.merge_chunk(&chunk),
            _ => Err(Unusable),
        };
        if merged.is_err() {
            self.give_up();
        }
    }

    /// Merges one stream chunk into the answer.
    fn merge_chunk(&mut self, chunk: &Map<String, Value>) -> Result<(), Unusable> {
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            return Err(Unusable);
        }
        for name in HEADER_FIELDS {
            if self.header.contains_key(name) {
                continue;
            }
            if let Some(value) = chunk.get(name).filter(|v| !v.is_null()) {
                self.header.insert(name.to_string(), value.clone());
            }
        }
        match chunk.get("usage") {
            None | Some(Value::Null) => {}
            Some(usage @ Value::Object(_)) => self.usage = Some(usage.clone()),
            Some(_) => return Err(Unusable),
        }
        match chunk.get("choices") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Array(choices)) => choices.iter().try_for_each(|c| self.merge_choice(c)),
            Some(_) => Err(Unusable),
        }
    }

    /// Merges one streamed choice into the choice of the same `index`.
    fn merge_choice(&mut self, streamed: &Value) -> Result<(), Unusable> {
        let streamed = streamed.as_object().ok_or(Unusable)?;
        let index = match streamed.get("index") {
            None => 0,
            Some(index) => index.as_u64().ok_or(Unusable)?,
        };
        let kind = self.kind;
        // A choice of the other endpoint's shape: not an answer of this kind.
        let foreign = match kind {
            Kind::Chat => "text",
            Kind::Completion => "delta",
        };
        if streamed.get(foreign).is_some_and(|v| !v.is_null()) {
            return Err(Unusable);
        }
        let choice = self.choices.entry(index).or_default();
        match kind {
            Kind::Chat => match streamed.get("delta") {
                None | Some(Value::Null) => {}
                Some(Value::Object(delta)) => choice.merge_delta(delta)?,
                Some(_) => return Err(Unusable),
            },
            Kind::Completion => {
                let text = streamed.get("text").unwrap_or(&Value::Null);
                match text {
                    Value::Null | Value::String(_) => {
                        append_piece(&mut choice.fields, "text", text)?
                    }
                    _ => return Err(Unusable),
                }
            }
        }
        choice.merge_finish_reason(streamed.get("finish_reason"))?;
        choice.merge_logprobs(streamed.get("logprobs"))
    }

    /// The non-stream answer: the header, the choices by index, the usage if any came.
    fn answer(self) -> Value {
        let kind = self.kind;
        let mut answer = header_of(&self.header, kind.answer_object());
        let choices = self
            .choices
            .into_iter()
            .map(|(index, choice)| match kind {
                Kind::Chat => choice.into_chat(index),
                Kind::Completion => choice.into_completion(index),
            })
            .collect();
        answer.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = self.usage {
            answer.insert("usage".into(), usage);
        }
        Value::Object(answer)
    }
}

impl Choice {
    /// Merges a chat `delta`: role once, tool calls by index, every other field as a piece.
    fn merge_delta(&mut self, delta: &Map<String, Value>) -> Result<(), Unusable> {
        for (name, value) in delta {
            match name.as_str() {
                "role" => set_once(&mut self.role, value)?,
                "tool_calls" => self.merge_tool_calls(value)?,
                // The message's text: a list here (content parts) would assemble into an
                // answer that cannot be replayed as a stream.
                "content" if !matches!(value, Value::String(_) | Value::Null) => {
                    return Err(Unusable)
                }
                _ => append_piece(&mut self.fields, name, value)?,
            }
        }
        Ok(())
    }

    /// Merges streamed tool calls into those of the same `index` (their position in the
    /// delta when a provider leaves `index` out).
    fn merge_tool_calls(&mut self, calls: &Value) -> Result<(), Unusable> {
        let calls = match calls {
            Value::Null => return Ok(()),
            Value::Array(calls) => calls,
            _ => return Err(Unusable),
        };
        for (position, call) in calls.iter().enumerate() {
            let call = call.as_object().ok_or(Unusable)?;
            let index = match call.get("index") {
                None => u64::try_from(position).map_err(|_| Unusable)?,
                Some(index) => index.as_u64().ok_or(Unusable)?,
            };
            let merged = self.tool_calls.entry(index).or_default();
            set_once(&mut merged.id, call.get("id").unwrap_or(&Value::Null))?;
            set_once(&mut merged.kind, call.get("type").unwrap_or(&Value::Null))?;
            match call.get("function") {
                None | Some(Value::Null) => {}
                Some(Value::Object(function)) => {
                    set_once(
                        &mut merged.name,
                        function.get("name").unwrap_or(&Value::Null),
                    )?;
                    match function.get("arguments") {
                        None | Some(Value::Null) => {}
                        Some(Value::String(more)) => merged.arguments.push_str(more),
                        Some(_) => return Err(Unusable),
                    }
                }
                Some(_) => return Err(Unusable),
            }
        }
        Ok(())
    }

    /// Keeps the last non-null `finish_reason`.
    fn merge_finish_reason(&mut self, reason: Option<&Value>) -> Result<(), Unusable> {
        match reason {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(reason)) => {
                self.finish_reason = Some(reason.clone());
                Ok(())
            }
            Some(_) => Err(Unusable),
        }
    }

    /// Concatenates the lists of a streamed `logprobs` object.
    fn merge_logprobs(&mut self, logprobs: Option<&Value>) -> Result<(), Unusable> {
        match logprobs {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Object(lists)) => lists.iter().try_for_each(|(name, list)| match list {
                Value::Null | Value::Array(_) => append_piece(&mut self.logprobs, name, list),
                _ => Err(Unusable),
            }),
            Some(_) => Err(Unusable),
        }
    }

    /// The `logprobs` of the answer: `null` when none came.
    fn logprobs_value(logprobs: Map<String, Value>) -> Value {
        if logprobs.is_empty() {
            Value::Null
        } else {
            Value::Object(logprobs)
        }
    }

    /// The choice of a `chat.completion` answer.
    fn into_chat(self, index: u64) -> Value {
        let mut message = self.fields;
        let role = self.role.unwrap_or_else(|| "assistant".to_string());
        message.insert("role".into(), Value::String(role));
        message.entry("content").or_insert(Value::Null);
        if !self.tool_calls.is_empty() {
            let calls = self
                .tool_calls
                .into_values()
                .map(ToolCall::into_value)
                .collect();
            message.insert("tool_calls".into(), Value::Array(calls));
        }
        let mut choice = Map::new();
        choice.insert("index".into(), Value::from(index));
        choice.insert("message".into(), Value::Object(message));
        choice.insert("logprobs".into(), Choice::logprobs_value(self.logprobs));
        choice.insert("finish_reason".into(), optional_string(self.finish_reason));
        Value::Object(choice)
    }

    /// The choice of a `text_completion` answer.
    fn into_completion(mut self, index: u64) -> Value {
        let text = self
            .fields
            .remove("text")
            .unwrap_or_else(|| Value::String(String::new()));
        let mut choice = Map::new();
        choice.insert("index".into(), Value::from(index));
        choice.insert("text".into(), text);
        choice.insert("logprobs".into(), Choice::logprobs_value(self.logprobs));
        choice.insert("finish_reason".into(), optional_string(self.finish_reason));
        Value::Object(choice)
    }
}

impl ToolCall {
    /// The tool call as a non-stream message carries it.
    fn into_value(self) -> Value {
        let mut function = Map::new();
        function.insert("name".into(), optional_string(self.name));
        function.insert("arguments".into(), Value::String(self.arguments));
        let mut call = Map::new();
        call.insert("id".into(), optional_string(self.id));
        let kind = self.kind.unwrap_or_else(|| "function".to_string());
        call.insert("type".into(), Value::String(kind));
        call.insert("function".into(), Value::Object(function));
        Value::Object(call)
    }
}

/// Appends one streamed piece to what `name` holds so far: text to text, list items to a list.
/// `null` adds nothing. Anything else (an object, a number, a text after a list) cannot be
/// merged faithfully.
fn append_piece(into: &mut Map<String, Value>, name: &str, piece: &Value) -> Result<(), Unusable> {
    match (into.get_mut(name), piece) {
        (_, Value::Null) => Ok(()),
        (None, Value::String(_) | Value::Array(_)) => {
            into.insert(name.to_string(), piece.clone());
            Ok(())
        }
        (Some(Value::String(have)), Value::String(more)) => {
            have.push_str(more);
            Ok(())
        }
        (Some(Value::Array(have)), Value::Array(more)) => {
            have.extend(more.iter().cloned());
            Ok(())
        }
        _ => Err(Unusable),
    }
}

/// Keeps the first string given for a field sent once (a role, a tool call's id or name).
fn set_once(slot: &mut Option<String>, value: &Value) -> Result<(), Unusable> {
    match value {
        Value::Null => Ok(()),
        Value::String(s) => {
            if slot.is_none() {
                *slot = Some(s.clone());
            }
            Ok(())
        }
        _ => Err(Unusable),
    }
}

/// A string, or `null`.
fn optional_string(s: Option<String>) -> Value {
    s.map_or(Value::Null, Value::String)
}
