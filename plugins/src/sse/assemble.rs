//! One cached answer, two renderings. An answer is stored as the JSON body of the equivalent
//! non-stream response, whichever way it was first asked for: a stream is assembled into that
//! shape as it passes ([`Assembler`]), and a stream request is answered by rendering the stored
//! body back to SSE ([`render_sse`]). One entry then serves both kinds of request.
//!
//! Only a stream that ended properly (`data: [DONE]`, no `error` event, every event valid JSON
//! of the expected shape) assembles: a truncated or failed stream is never stored. Streams come
//! from upstream providers and may be malformed; nothing here panics on any input.
//!
//! Streamed pieces are merged the way OpenAI splits them: text fields of a delta (`content`,
//! `refusal`, and extensions such as `reasoning_content`) are concatenated, list fields are
//! extended, tool calls are merged by their `index`. A delta field that cannot be merged
//! faithfully (an object, such as the legacy `function_call` or `audio`) makes the stream
//! unusable rather than stored incomplete.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// Which OpenAI endpoint a body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions` (legacy text completions).
    Completion,
}

impl Kind {
    /// The `object` of a non-stream answer.
    fn answer_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        }
    }

    /// The `object` of a stream chunk (text completions use the same one as the answer).
    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }
}

/// Top-level fields that describe the whole answer; each chunk repeats them, the answer keeps
/// the first value seen. `object` is not among them: it differs between chunk and answer.
const HEADER_FIELDS: [&str; 5] = [
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

/// Header fields every answer and chunk carries, `null` when the upstream never sent them.
const REQUIRED_HEADER_FIELDS: [&str; 3] = ["id", "created", "model"];

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

/// The header fields of `from` with `object` set: `id`, `created` and `model` always
/// (`null` when missing), the optional ones when present.
fn header_of(from: &Map<String, Value>, object: &str) -> Map<String, Value> {
    let mut header = Map::new();
    for name in HEADER_FIELDS {
        match from.get(name) {
            Some(value) if !value.is_null() => {
                header.insert(name.to_string(), value.clone());
            }
            _ if REQUIRED_HEADER_FIELDS.contains(&name) => {
                header.insert(name.to_string(), Value::Null);
            }
            _ => {}
        }
    }
    header.insert("object".into(), Value::String(object.to_string()));
    header
}

/// Renders a non-stream body (a `chat.completion` or `text_completion` answer) as the SSE bytes
/// an OpenAI stream would have carried, ending with `data: [DONE]\n\n`: per choice a chunk with
/// its whole content, then per choice a chunk with its `finish_reason`, then (`include_usage`,
/// as OpenAI does for `stream_options.include_usage`, and only when the body has usage) a
/// chunk with `choices: []` and the `usage`. `None` if the body is not a valid answer of `kind`.
pub fn render_sse(kind: Kind, body: &[u8], include_usage: bool) -> Option<Vec<u8>> {
    let answer = match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(answer) => answer,
        _ => return None,
    };
    let choices = answer.get("choices")?.as_array()?;
    if choices.is_empty() {
        return None;
    }
    let usage = match answer.get("usage") {
        None | Some(Value::Null) => None,
        Some(usage @ Value::Object(_)) => Some(usage),
        Some(_) => return None,
    };
    let mut openings = Vec::with_capacity(choices.len());
    let mut endings = Vec::with_capacity(choices.len());
    let mut indexes = BTreeSet::new();
    for choice in choices {
        let choice = choice.as_object()?;
        let index = choice.get("index")?.as_u64()?;
        if !indexes.insert(index) {
            return None;
        }
        let (opening, ending) = match kind {
            Kind::Chat => chat_choice_chunks(choice, index)?,
            Kind::Completion => completion_choice_chunks(choice, index)?,
        };
        openings.push(opening);
        endings.push(ending);
    }
    let header = header_of(&answer, kind.chunk_object());
    let mut out = Vec::with_capacity(body.len().saturating_mul(2).saturating_add(256));
    for choice in openings.into_iter().chain(endings) {
        let mut chunk = header.clone();
        chunk.insert("choices".into(), Value::Array(vec![choice]));
        write_event(&mut out, &chunk)?;
    }
    if let Some(usage) = usage.filter(|_| include_usage) {
        let mut chunk = header;
        chunk.insert("choices".into(), Value::Array(Vec::new()));
        chunk.insert("usage".into(), usage.clone());
        write_event(&mut out, &chunk)?;
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Some(out)
}

/// The two streamed choices of one chat choice: its whole message as one delta, then an empty
/// delta with its `finish_reason`.
fn chat_choice_chunks(choice: &Map<String, Value>, index: u64) -> Option<(Value, Value)> {
    let message = choice.get("message")?.as_object()?;
    let delta = chat_delta(message)?;
    let opening = streamed_choice(index, "delta", Value::Object(delta), logprobs_of(choice)?);
    let mut ending = streamed_choice(index, "delta", Value::Object(Map::new()), Value::Null);
    ending.insert("finish_reason".into(), finish_reason_of(choice)?);
    Some((Value::Object(opening), Value::Object(ending)))
}

/// The two streamed choices of one completion choice: its whole text, then an empty text with
/// its `finish_reason`.
fn completion_choice_chunks(choice: &Map<String, Value>, index: u64) -> Option<(Value, Value)> {
    let text = match choice.get("text")? {
        text @ Value::String(_) => text.clone(),
        _ => return None,
    };
    let opening = streamed_choice(index, "text", text, logprobs_of(choice)?);
    let empty = Value::String(String::new());
    let mut ending = streamed_choice(index, "text", empty, Value::Null);
    ending.insert("finish_reason".into(), finish_reason_of(choice)?);
    Some((Value::Object(opening), Value::Object(ending)))
}

/// A streamed choice with `finish_reason: null`.
fn streamed_choice(index: u64, field: &str, value: Value, logprobs: Value) -> Map<String, Value> {
    let mut choice = Map::new();
    choice.insert("index".into(), Value::from(index));
    choice.insert(field.to_string(), value);
    choice.insert("logprobs".into(), logprobs);
    choice.insert("finish_reason".into(), Value::Null);
    choice
}

/// The whole message as one delta: `role` (default `assistant`), `content` (`null` if none),
/// `tool_calls` with their `index`, and every other non-null field as it is (`refusal`,
/// `reasoning_content`, `annotations`, ...).
fn chat_delta(message: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut delta = Map::new();
    let role = match message.get("role") {
        None | Some(Value::Null) => Value::String("assistant".to_string()),
        Some(role @ Value::String(_)) => role.clone(),
        Some(_) => return None,
    };
    delta.insert("role".into(), role);
    let content = match message.get("content") {
        None | Some(Value::Null) => Value::Null,
        Some(content @ Value::String(_)) => content.clone(),
        Some(_) => return None,
    };
    delta.insert("content".into(), content);
    for (name, value) in message {
        if matches!(name.as_str(), "role" | "content" | "tool_calls") || value.is_null() {
            continue;
        }
        delta.insert(name.clone(), value.clone());
    }
    match message.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) if calls.is_empty() => {}
        Some(Value::Array(calls)) => {
            delta.insert(
                "tool_calls".into(),
                Value::Array(indexed_tool_calls(calls)?),
            );
        }
        Some(_) => return None,
    }
    Some(delta)
}

/// Tool calls as a delta carries them: each with its `index`, its position in the message.
fn indexed_tool_calls(calls: &[Value]) -> Option<Vec<Value>> {
    let mut indexed = Vec::with_capacity(calls.len());
    for (position, call) in calls.iter().enumerate() {
        let mut call = call.as_object()?.clone();
        call.insert("index".into(), Value::from(position));
        indexed.push(Value::Object(call));
    }
    Some(indexed)
}

/// A choice's `logprobs`: an object, or `null`.
fn logprobs_of(choice: &Map<String, Value>) -> Option<Value> {
    match choice.get("logprobs") {
        None | Some(Value::Null) => Some(Value::Null),
        Some(logprobs @ Value::Object(_)) => Some(logprobs.clone()),
        Some(_) => None,
    }
}

/// A choice's `finish_reason`: a string, or `null`.
fn finish_reason_of(choice: &Map<String, Value>) -> Option<Value> {
    match choice.get("finish_reason") {
        None | Some(Value::Null) => Some(Value::Null),
        Some(reason @ Value::String(_)) => Some(reason.clone()),
        Some(_) => None,
    }
}

/// Writes one SSE event: `data: <json>\n\n`.
fn write_event(out: &mut Vec<u8>, chunk: &Map<String, Value>) -> Option<()> {
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, chunk).ok()?;
    out.extend_from_slice(b"\n\n");
    Some(())
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
    use serde_json::json;

    /// A chat stream as OpenAI sends it with `stream_options.include_usage`.
    const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\u00e9\\n!\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-x\",\"system_fingerprint\":\"fp_1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    fn chat_answer() -> Value {
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-x",
            "system_fingerprint": "fp_1",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello é\n!"},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        })
    }

    /// Assembles `pieces` pushed one after the other.
    fn assemble_pieces<'a>(
        kind: Kind,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<Value> {
        let mut assembler = Assembler::new(kind, 1 << 20);
        for piece in pieces {
            assembler.push(piece);
        }
        let body = assembler.finish()?;
        Some(serde_json::from_slice(&body).expect("finish gives JSON"))
    }

    /// Assembles `bytes` pushed in chunks of `size`.
    fn assemble(kind: Kind, bytes: &[u8], size: usize) -> Option<Value> {
        assemble_pieces(kind, bytes.chunks(size.max(1)))
    }

    fn assemble_str(kind: Kind, stream: &str) -> Option<Value> {
        assemble(kind, stream.as_bytes(), usize::MAX)
    }

    /// A chunk of a chat stream with `choices`, for short tests.
    fn chat_chunk(choices: Value) -> String {
        let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                           "model": "m", "choices": choices});
        format!("data: {chunk}\n\n")
    }

    fn chat_stream_of(chunks: &[Value]) -> String {
        let mut stream: String = chunks.iter().map(|c| chat_chunk(c.clone())).collect();
        stream.push_str("data: [DONE]\n\n");
        stream
    }

    #[test]
    fn a_chat_stream_assembles_split_at_every_byte() {
        let bytes = CHAT_STREAM.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(
                assemble_pieces(Kind::Chat, [a, b]),
                Some(chat_answer()),
                "split at {at}"
            );
        }
        for size in 1..=bytes.len() {
            assert_eq!(
                assemble(Kind::Chat, bytes, size),
                Some(chat_answer()),
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn crlf_and_cr_line_ends_assemble_split_anywhere() {
        for end in ["\r\n", "\r"] {
            let stream = CHAT_STREAM.replace('\n', end);
            let bytes = stream.as_bytes();
            for at in 0..=bytes.len() {
                let (a, b) = bytes.split_at(at);
                let got = assemble_pieces(Kind::Chat, [a, &b""[..], b]);
                assert_eq!(got, Some(chat_answer()), "{end:?} split at {at}");
            }
            assert_eq!(assemble(Kind::Chat, bytes, 1), Some(chat_answer()));
        }
    }

    #[test]
    fn comments_other_fields_and_multi_line_data_are_understood() {
        let stream = concat!(
            ": keep-alive\n\n",
            "id: 1\nretry: 100\nevent: message\n",
            "data: {\"id\":\"c\",\"created\":1,\"model\":\"m\",\n",
            "data: \"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data:{\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data:\n\n",
            "data: [DONE]\n\n",
            "data: {\"error\":{\"message\":\"after the end\"}}\n\n",
            "data: not json either\n\n",
        );
        let body = assemble_str(Kind::Chat, stream).expect("assembles");
        assert_eq!(body["choices"][0]["message"]["content"], "a");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn a_stream_ending_right_after_done_assembles() {
        let stream = CHAT_STREAM.trim_end();
        assert!(stream.ends_with("[DONE]"));
        assert_eq!(assemble_str(Kind::Chat, stream), Some(chat_answer()));
    }

    #[test]
    fn a_stream_without_done_does_not_assemble() {
        // Every prefix that stops before `data: [DONE]` is whole is a truncated stream.
        let whole = CHAT_STREAM.len() - "\n\n".len();
        for end in 0..whole {
            let prefix = &CHAT_STREAM.as_bytes()[..end];
            assert_eq!(
                assemble(Kind::Chat, prefix, 13),
                None,
                "prefix of {end} bytes"
            );
        }
        assert_eq!(assemble(Kind::Chat, b"", 1), None);
    }

    #[test]
    fn an_error_event_does_not_assemble() {
        let cut = CHAT_STREAM.len() - "data: [DONE]\n\n".len();
        let (head, done) = CHAT_STREAM.split_at(cut);
        for error in [
            "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
            "event: error\ndata: {\"message\":\"overloaded\"}\n\n",
            "event: error\n\n",
        ] {
            let stream = format!("{head}{error}{done}");
            assert_eq!(assemble_str(Kind::Chat, &stream), None, "{error}");
        }
        let harmless = format!("{head}data: {{\"error\":null,\"choices\":[]}}\n\n{done}");
        assert_eq!(assemble_str(Kind::Chat, &harmless), Some(chat_answer()));
    }

    #[test]
    fn malformed_events_do_not_assemble() {
        let cut = CHAT_STREAM.len() - "data: [DONE]\n\n".len();
        let (head, done) = CHAT_STREAM.split_at(cut);
        for bad in [
            "data: {not json}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]\n\n",
            "data: 42\n\n",
            "data: \"text\"\n\n",
            "data: [1]\n\n",
            "data: {\"choices\":{}}\n\n",
            "data: {\"choices\":[7]}\n\n",
            "data: {\"choices\":[{\"index\":\"0\",\"delta\":{}}]}\n\n",
            "data: {\"choices\":[{\"index\":-1,\"delta\":{}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":\"x\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":5}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":[\"a\"]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":1}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"function_call\":{\"name\":\"f\"}}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":{}}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[1]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":{}}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":1}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":[]}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":{\"content\":\"x\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":7}\n\n",
            "data: \u{7f}\u{0}\n\n",
        ] {
            let stream = format!("{head}{bad}{done}");
            assert_eq!(assemble_str(Kind::Chat, &stream), None, "{bad}");
        }
        let mut invalid_utf8 = head.as_bytes().to_vec();
        invalid_utf8.extend_from_slice(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\"}}]}\n\n",
        );
        invalid_utf8.extend_from_slice(done.as_bytes());
        assert_eq!(assemble(Kind::Chat, &invalid_utf8, 5), None);
    }

    #[test]
    fn a_stream_of_no_choice_does_not_assemble() {
        assert_eq!(assemble_str(Kind::Chat, "data: [DONE]\n\n"), None);
        assert_eq!(
            assemble_str(Kind::Chat, &chat_stream_of(&[json!([])])),
            None
        );
    }

    #[test]
    fn the_limit_is_on_sse_bytes() {
        let bytes = CHAT_STREAM.as_bytes();
        let mut exact = Assembler::new(Kind::Chat, bytes.len());
        for piece in bytes.chunks(10) {
            exact.push(piece);
        }
        assert!(exact.finish().is_some());
        let mut over = Assembler::new(Kind::Chat, bytes.len() - 1);
        for piece in bytes.chunks(10) {
            over.push(piece);
        }
        assert_eq!(over.finish(), None);
        let mut zero = Assembler::new(Kind::Chat, 0);
        zero.push(b"");
        zero.push(b"d");
        assert_eq!(zero.finish(), None);
    }

    #[test]
    fn tool_calls_merge_by_index() {
        let stream = chat_stream_of(&[
            json!([{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}]}}]),
            json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}}]),
            json!([{"index": 0, "delta": {"tool_calls": [
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "put", "arguments": "{}"}}]}}]),
            json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\":1}"}}]}}]),
            json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        ]);
        let body = assemble(Kind::Chat, stream.as_bytes(), 7).expect("assembles");
        assert_eq!(
            body["choices"],
            json!([{
                "index": 0,
                "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get", "arguments": "{\"city\":1}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "put", "arguments": "{}"}}
                ]},
                "logprobs": null,
                "finish_reason": "tool_calls"
            }])
        );
    }

    #[test]
    fn tool_calls_without_an_index_merge_by_position() {
        let stream = chat_stream_of(&[json!([{"index": 0, "delta": {"tool_calls": [
            {"id": "a", "function": {"name": "f", "arguments": "1"}},
            {"id": "b", "function": {"name": "g", "arguments": "2"}}]}, "finish_reason": "tool_calls"}])]);
        let body = assemble_str(Kind::Chat, &stream).expect("assembles");
        let calls = &body["choices"][0]["message"]["tool_calls"];
        assert_eq!(calls[0]["id"], "a");
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[1]["function"]["arguments"], "2");
        assert_eq!(
            body["choices"][0]["message"]["role"], "assistant",
            "the default role"
        );
    }

    #[test]
    fn choices_merge_by_index_and_come_out_sorted() {
        let stream = chat_stream_of(&[
            json!([{"index": 1, "delta": {"role": "assistant", "content": "B"}}]),
            json!([{"index": 0, "delta": {"role": "assistant", "content": "A"}}]),
            json!([{"index": 1, "delta": {"content": "b"}, "finish_reason": "length"},
                   {"index": 0, "delta": {"content": "a"}}]),
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ]);
        let body = assemble_str(Kind::Chat, &stream).expect("assembles");
        assert_eq!(body["choices"][0]["index"], 0);
        assert_eq!(body["choices"][0]["message"]["content"], "Aa");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["choices"][1]["index"], 1);
        assert_eq!(body["choices"][1]["message"]["content"], "Bb");
        assert_eq!(body["choices"][1]["finish_reason"], "length");
        assert!(body.get("usage").is_none(), "no usage came");
    }

    #[test]
    fn refusals_reasoning_and_logprobs_are_concatenated() {
        let token =
            |t: &str| json!({"token": t, "logprob": -0.5, "bytes": null, "top_logprobs": []});
        let stream = chat_stream_of(&[
            json!([{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think"},
                    "logprobs": {"content": [token("I")], "refusal": null}}]),
            json!([{"index": 0, "delta": {"reasoning_content": "ing", "refusal": "I can"},
                    "logprobs": {"content": [token("x"), token("y")]}}]),
            json!([{"index": 0, "delta": {"refusal": "not."}, "logprobs": null}]),
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ]);
        let body = assemble_str(Kind::Chat, &stream).expect("assembles");
        let choice = &body["choices"][0];
        assert_eq!(
            choice["message"]["content"],
            Value::Null,
            "no content ever came"
        );
        assert_eq!(choice["message"]["refusal"], "I cannot.");
        assert_eq!(choice["message"]["reasoning_content"], "Thinking");
        assert_eq!(
            choice["logprobs"],
            json!({"content": [token("I"), token("x"), token("y")]})
        );
    }

    #[test]
    fn the_header_comes_from_the_first_chunk_that_has_it() {
        let stream = concat!(
            "data: {\"id\":\"first\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"id\":\"second\",\"created\":2,\"model\":\"n\",\"system_fingerprint\":\"fp\",\"service_tier\":\"default\",\"choices\":[]}\n\n",
            "data: [DONE]\n\n",
        );
        let body = assemble_str(Kind::Chat, stream).expect("assembles");
        assert_eq!(body["id"], "first");
        assert_eq!(body["created"], 1);
        assert_eq!(body["model"], "m");
        assert_eq!(body["system_fingerprint"], "fp");
        assert_eq!(body["service_tier"], "default");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["finish_reason"], Value::Null);
    }

    #[test]
    fn a_completion_stream_assembles() {
        let stream = concat!(
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\"Once\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}\r\n\r\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\" upon\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\"}]}\r\n\r\n",
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":3,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\n\r\n",
            "data: [DONE]\r\n\r\n",
        );
        let expected = json!({
            "id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m",
            "choices": [{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        });
        for size in 1..=stream.len() {
            assert_eq!(
                assemble(Kind::Completion, stream.as_bytes(), size),
                Some(expected.clone())
            );
        }
        let bad = stream.replace("\" upon\"", "3");
        assert_eq!(assemble_str(Kind::Completion, &bad), None);
    }

    #[test]
    fn completion_logprobs_are_concatenated() {
        let stream = concat!(
            "data: {\"id\":\"c\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\"a\",\"index\":0,\"logprobs\":{\"tokens\":[\"a\"],\"token_logprobs\":[-1.0],\"top_logprobs\":null,\"text_offset\":[0]}}]}\n\n",
            "data: {\"id\":\"c\",\"created\":3,\"model\":\"m\",\"choices\":[{\"text\":\"b\",\"index\":0,\"logprobs\":{\"tokens\":[\"b\"],\"token_logprobs\":[-2.0],\"top_logprobs\":null,\"text_offset\":[1]},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let body = assemble_str(Kind::Completion, stream).expect("assembles");
        assert_eq!(
            body["choices"][0]["logprobs"],
            json!({"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "text_offset": [0, 1]})
        );
    }

    #[test]
    fn a_stream_of_the_other_endpoint_does_not_assemble() {
        assert_eq!(assemble_str(Kind::Completion, CHAT_STREAM), None);
        let stream = "data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\ndata: [DONE]\n\n";
        assert_eq!(assemble_str(Kind::Chat, stream), None);
        assert!(assemble_str(Kind::Completion, stream).is_some());
    }

    #[test]
    fn damaged_streams_never_panic() {
        let bytes = CHAT_STREAM.as_bytes();
        for at in 0..bytes.len() {
            for replacement in [b'{', b'"', b'\n', b'\r', b':', b'\\', 0xff, b'0'] {
                let mut damaged = bytes.to_vec();
                damaged[at] = replacement;
                let _ = assemble(Kind::Chat, &damaged, 11);
                let _ = assemble(Kind::Completion, &damaged, 11);
            }
        }
        // Pseudo-random bytes.
        let mut state: u32 = 0x1234_5678;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state.to_le_bytes()[0]
            })
            .collect();
        assert_eq!(assemble(Kind::Chat, &noise, 17), None);
    }

    /// Splits rendered SSE into its events' JSON, checking the framing.
    fn events(sse: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(sse).expect("UTF-8");
        let body = text
            .strip_suffix("data: [DONE]\n\n")
            .expect("ends with [DONE]");
        assert!(body.is_empty() || body.ends_with("\n\n"));
        body.split_terminator("\n\n")
            .map(|event| {
                let json = event.strip_prefix("data: ").expect("a data event");
                assert!(!json.contains('\n'), "one line per event");
                serde_json::from_str(json).expect("JSON")
            })
            .collect()
    }

    fn render(kind: Kind, body: &Value, include_usage: bool) -> Option<Vec<u8>> {
        render_sse(
            kind,
            &serde_json::to_vec(body).expect("JSON"),
            include_usage,
        )
    }

    #[test]
    fn a_chat_answer_renders_as_openai_streams_it() {
        let sse = render(Kind::Chat, &chat_answer(), true).expect("renders");
        let head = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                          "model": "gpt-x", "system_fingerprint": "fp_1"});
        let with = |extra: Value| {
            let mut chunk = head.clone();
            for (k, v) in extra.as_object().expect("object") {
                chunk[k] = v.clone();
            }
            chunk
        };
        assert_eq!(
            events(&sse),
            vec![
                with(
                    json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello é\n!"},
                                         "logprobs": null, "finish_reason": null}]})
                ),
                with(
                    json!({"choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]})
                ),
                with(
                    json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})
                ),
            ]
        );
        let without = render(Kind::Chat, &chat_answer(), false).expect("renders");
        assert_eq!(events(&without).len(), 2);
        assert!(events(&without).iter().all(|e| e.get("usage").is_none()));
        let mut no_usage = chat_answer();
        no_usage.as_object_mut().expect("object").remove("usage");
        assert_eq!(
            events(&render(Kind::Chat, &no_usage, true).expect("renders")).len(),
            2
        );
    }

    #[test]
    fn rendering_gives_each_tool_call_its_index() {
        let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
                "annotations": [], "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": "[]"}}]},
                "logprobs": null, "finish_reason": "tool_calls"}]});
        let sse = render(Kind::Chat, &body, false).expect("renders");
        let delta = &events(&sse)[0]["choices"][0]["delta"];
        assert_eq!(
            *delta,
            json!({"role": "assistant", "content": null, "annotations": [], "tool_calls": [
                {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "[]"}}]})
        );
    }

    #[test]
    fn a_completion_answer_renders_as_openai_streams_it() {
        let body = json!({"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m",
            "choices": [{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}});
        let sse = render(Kind::Completion, &body, true).expect("renders");
        let head = |choices: Value| json!({"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m", "choices": choices});
        let mut usage = head(json!([]));
        usage["usage"] = body["usage"].clone();
        assert_eq!(
            events(&sse),
            vec![
                head(
                    json!([{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": null}])
                ),
                head(
                    json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}])
                ),
                usage,
            ]
        );
    }

    #[test]
    fn invalid_answers_do_not_render() {
        let chat =
            |choice: Value| json!({"id": "c", "created": 1, "model": "m", "choices": [choice]});
        let message = |m: Value| chat(json!({"index": 0, "message": m, "finish_reason": "stop"}));
        for (kind, body) in [
            (Kind::Chat, json!([])),
            (Kind::Chat, json!("x")),
            (Kind::Chat, json!({"error": {"message": "no"}})),
            (Kind::Chat, json!({"choices": []})),
            (Kind::Chat, json!({"choices": {}})),
            (Kind::Chat, json!({"choices": [1]})),
            (Kind::Chat, chat(json!({"message": {"content": "a"}}))),
            (
                Kind::Chat,
                chat(json!({"index": "0", "message": {"content": "a"}})),
            ),
            (Kind::Chat, chat(json!({"index": 0}))),
            (Kind::Chat, message(json!("a"))),
            (Kind::Chat, message(json!({"content": 1}))),
            (
                Kind::Chat,
                message(json!({"content": [{"type": "text", "text": "a"}]})),
            ),
            (Kind::Chat, message(json!({"role": 5, "content": "a"}))),
            (
                Kind::Chat,
                message(json!({"content": null, "tool_calls": {}})),
            ),
            (
                Kind::Chat,
                message(json!({"content": null, "tool_calls": ["a"]})),
            ),
            (
                Kind::Chat,
                chat(json!({"index": 0, "message": {"content": "a"}, "finish_reason": 1})),
            ),
            (
                Kind::Chat,
                chat(json!({"index": 0, "message": {"content": "a"}, "logprobs": []})),
            ),
            (
                Kind::Completion,
                chat(json!({"index": 0, "message": {"content": "a"}})),
            ),
            (Kind::Completion, chat(json!({"index": 0, "text": null}))),
            (Kind::Chat, chat(json!({"index": 0, "text": "a"}))),
        ] {
            assert_eq!(render(kind, &body, true), None, "{kind:?} {body}");
        }
        let duplicate = json!({"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]});
        assert_eq!(render(Kind::Completion, &duplicate, false), None);
        let mut bad_usage = chat_answer();
        bad_usage["usage"] = json!("many");
        assert_eq!(render(Kind::Chat, &bad_usage, true), None);
        assert_eq!(render_sse(Kind::Chat, b"", false), None);
        assert_eq!(render_sse(Kind::Chat, b"{\"choices\":[", false), None);
        assert_eq!(render_sse(Kind::Chat, b"\xff\xfe", false), None);
    }

    /// Renders `body` as SSE, assembles it back (split in several ways) and returns what came back.
    fn round_trip(kind: Kind, body: &Value) -> Value {
        let sse = render(kind, body, true).expect("renders");
        let whole = assemble(kind, &sse, usize::MAX).expect("assembles");
        for size in [1, 2, 7, 64] {
            assert_eq!(assemble(kind, &sse, size).as_ref(), Some(&whole));
        }
        whole
    }

    #[test]
    fn rendered_answers_assemble_back_to_themselves() {
        let tool_calls = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        let several = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "service_tier": "default",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": "no",
                    "annotations": []},
                 "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]},
                 "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": ""}, "logprobs": null,
                 "finish_reason": "length"},
                {"index": 2, "message": {"role": "assistant", "content": "x", "reasoning_content": "why"},
                 "logprobs": null, "finish_reason": null}]});
        let completion = json!({"id": "t", "object": "text_completion", "created": 1, "model": "m",
            "choices": [
                {"index": 0, "text": "abc", "logprobs": null, "finish_reason": "stop"},
                {"index": 1, "text": "", "logprobs": {"tokens": ["x"], "token_logprobs": [-1.0]},
                 "finish_reason": "length"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}});
        assert_eq!(round_trip(Kind::Chat, &chat_answer()), chat_answer());
        assert_eq!(round_trip(Kind::Chat, &tool_calls), tool_calls);
        assert_eq!(round_trip(Kind::Chat, &several), several);
        assert_eq!(round_trip(Kind::Completion, &completion), completion);
    }

    #[test]
    fn round_trips_keep_the_content_of_looser_answers() {
        // Unsorted choices, a missing role, `refusal: null`, no `object`: the content survives.
        let body = json!({"id": "c", "created": 1, "model": "m",
            "choices": [
                {"index": 1, "message": {"content": "b", "refusal": null}, "finish_reason": "stop"},
                {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}]});
        let back = round_trip(Kind::Chat, &body);
        assert_eq!(back["object"], "chat.completion");
        assert_eq!(back["choices"][0]["message"]["content"], "a");
        assert_eq!(
            back["choices"][1]["message"],
            json!({"role": "assistant", "content": "b"})
        );
        assert!(back.get("usage").is_none());
    }

    #[test]
    fn an_assembled_stream_renders_and_assembles_to_itself() {
        let once = assemble_str(Kind::Chat, CHAT_STREAM).expect("assembles");
        assert_eq!(round_trip(Kind::Chat, &once), once);
    }
}
