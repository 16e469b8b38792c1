//! [`render_sse`]: a non-stream JSON answer as the SSE stream OpenAI would have sent for it,
//! so that one stored answer also serves stream requests.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::kind::{header_of, Kind};

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
