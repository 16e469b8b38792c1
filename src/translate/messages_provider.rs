//! Chat Completions over a provider that speaks Anthropic's Messages API (`api: anthropic`):
//! the other direction of `messages.rs`.
//!
//! - [`request`]: a chat completions body → a Messages body (and the fields it left out).
//! - [`answer`]: a `message` → a chat completion.
//! - [`error`]: an Anthropic error body → OpenAI's error shape.
//! - [`ChunkTranslator`]: the Messages stream's events → chat completion chunks, ending with
//!   the usage chunk and `[DONE]`, so everything downstream (usage, cache, a Responses or
//!   Messages client's own translation) sees a chat stream.

use serde_json::{json, Map, Value};

use super::TranslateError;

/// `max_tokens` when the chat request sets none: the Messages API requires one.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Chat fields a Messages request has no place for (named in `x-lumen-dropped-params`).
const DROPPED: [&str; 7] = [
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "response_format",
];

/// A chat completions request as a Messages request for `model`.
pub fn request(chat: &Value, model: &str) -> Result<(Value, Vec<&'static str>), TranslateError> {
    let req = chat
        .as_object()
        .ok_or_else(|| TranslateError::invalid("body", "must be a JSON object"))?;
    if req.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(TranslateError::unsupported(
            "n",
            "a provider that speaks the Messages API answers one choice",
        ));
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| TranslateError::invalid("messages", "must be a list of messages"))?;
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        match role {
            "system" | "developer" => system.push(text_of(m.get("content"), &at)?),
            "user" => push_blocks(&mut turns, "user", user_blocks(m.get("content"), &at)?),
            "assistant" => {
                let mut blocks = Vec::new();
                let text = match m.get("content") {
                    None | Some(Value::Null) => String::new(),
                    content => text_of(content, &at)?,
                };
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                let calls = m.get("tool_calls").and_then(Value::as_array);
                for call in calls.map(Vec::as_slice).unwrap_or_default() {
                    let s = |p: &str| call.pointer(p).and_then(Value::as_str).unwrap_or("");
                    let input = match serde_json::from_str::<Value>(s("/function/arguments")) {
                        Ok(v @ Value::Object(_)) => v,
                        _ => json!({}),
                    };
                    blocks.push(json!({"type": "tool_use", "id": s("/id"),
                                       "name": s("/function/name"), "input": input}));
                }
                push_blocks(&mut turns, "assistant", blocks);
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        TranslateError::invalid(format!("{at}.tool_call_id"), "must be a string")
                    })?;
                let content = text_of(m.get("content"), &at)?;
                push_blocks(
                    &mut turns,
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": content})],
                );
            }
            _ => {
                return Err(TranslateError::invalid(
                    format!("{at}.role"),
                    "must be `system`, `developer`, `user`, `assistant` or `tool`",
                ))
            }
        }
    }
    if turns.is_empty() {
        return Err(TranslateError::invalid(
            "messages",
            "needs a user message for a provider that speaks the Messages API",
        ));
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::from(system.join("\n")));
    }
    out.insert("messages".into(), Value::Array(turns));
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), Value::from(max_tokens));
    for field in ["temperature", "top_p", "stream"] {
        if let Some(v) = req.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), v.clone());
        }
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(stops)) if !stops.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(stops.clone()));
        }
        _ => {}
    }
    if let Some(user) = req.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let mut list = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let f = t.get("function").ok_or_else(|| {
                TranslateError::unsupported(
                    format!("tools[{i}].type"),
                    "only function tools can be given to a provider that speaks the Messages API",
                )
            })?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                TranslateError::invalid(format!("tools[{i}].function.name"), "must be a string")
            })?;
            let mut tool = Map::new();
            tool.insert("name".into(), Value::from(name));
            if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                tool.insert("description".into(), d.clone());
            }
            tool.insert(
                "input_schema".into(),
                f.get("parameters")
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            );
            list.push(Value::Object(tool));
        }
        if !list.is_empty() {
            out.insert("tools".into(), Value::Array(list));
        }
    }
    let parallel = req.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
    let mut choice = match req.get("tool_choice") {
        Some(Value::String(s)) => match s.as_str() {
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => Some(json!({"type": "auto"})),
        },
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| json!({"type": "tool", "name": name})),
        _ => None,
    };
    if !parallel && out.contains_key("tools") {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if let Some(o) = c.as_object_mut() {
            o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    if let Some(choice) = choice.filter(|_| out.contains_key("tools")) {
        out.insert("tool_choice".into(), choice);
    }
    let dropped = DROPPED
        .iter()
        .copied()
        .filter(|f| chat.get(*f).is_some_and(|v| !v.is_null()))
        .collect();
    Ok((Value::Object(out), dropped))
}

/// Appends blocks as a turn of `role`, joining the turn before when it has the same role
/// (tool results after one another, a tool result then the user's text).
fn push_blocks(turns: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = turns.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some(role) {
            if let Some(content) = last.get_mut("content").and_then(Value::as_array_mut) {
                content.extend(blocks);
                return;
            }
        }
    }
    turns.push(json!({"role": role, "content": blocks}));
}

/// A chat message's content as text (a string, or its text parts joined).
fn text_of(content: Option<&Value>, at: &str) -> Result<String, TranslateError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("")),
        Some(_) => Err(TranslateError::invalid(
            format!("{at}.content"),
            "must be a string or a list of parts",
        )),
    }
}

/// A user message's content as Messages blocks: text, and images (a data: URL as base64, any
/// other URL as a `url` source).
fn user_blocks(content: Option<&Value>, at: &str) -> Result<Vec<Value>, TranslateError> {
    let parts = match content {
        Some(Value::String(s)) => return Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(TranslateError::invalid(
                format!("{at}.content"),
                "must be a string or a list of parts",
            ))
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = part.get("text").and_then(Value::as_str).unwrap_or("");
                blocks.push(json!({"type": "text", "text": text}));
            }
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let source = match url
                    .strip_prefix("data:")
                    .and_then(|rest| rest.split_once(";base64,"))
                {
                    Some((media, data)) => {
                        json!({"type": "base64", "media_type": media, "data": data})
                    }
                    None => json!({"type": "url", "url": url}),
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            _ => {
                return Err(TranslateError::unsupported(
                    format!("{at}.content[{i}].type"),
                    "a provider that speaks the Messages API takes text and image parts",
                ))
            }
        }
    }
    Ok(blocks)
}

/// A Messages `stop_reason` as a chat `finish_reason`.
fn finish_reason(stop: Option<&str>) -> Value {
    match stop {
        None => Value::Null,
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some("refusal") => json!("content_filter"),
        Some(_) => json!("stop"),
    }
}

/// A Messages `usage` in chat terms: cache reads and writes count as prompt tokens, as they
/// do in OpenAI's usage.
fn chat_usage(usage: Option<&Value>) -> Value {
    let n = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let cached = n("cache_read_input_tokens");
    let written = n("cache_creation_input_tokens");
    let prompt = n("input_tokens")
        .saturating_add(cached)
        .saturating_add(written);
    let completion = n("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
    })
}

/// A `message` as a chat completion.
pub fn answer(message: &Value, created: u64) -> Value {
    let mut text = String::new();
    let mut thinking = String::new();
    let mut calls = Vec::new();
    let blocks = message.get("content").and_then(Value::as_array);
    for block in blocks.map(Vec::as_slice).unwrap_or_default() {
        let s = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or("");
        match s("type") {
            "text" => text.push_str(s("text")),
            "thinking" => thinking.push_str(s("thinking")),
            "tool_use" => {
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({"id": s("id"), "type": "function",
                                  "function": {"name": s("name"), "arguments": input.to_string()}}));
            }
            _ => {}
        }
    }
    let mut msg = Map::new();
    msg.insert("role".into(), json!("assistant"));
    msg.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !thinking.is_empty() {
        msg.insert("reasoning_content".into(), Value::String(thinking));
    }
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    let stop = message.get("stop_reason").and_then(Value::as_str);
    let mut choice = json!({"index": 0, "message": msg, "finish_reason": finish_reason(stop)});
    if let (Some("stop_sequence"), Some(seq)) =
        (stop, message.get("stop_sequence").and_then(Value::as_str))
    {
        if let Some(c) = choice.as_object_mut() {
            c.insert("stop_reason".into(), Value::from(seq));
        }
    }
    json!({
        "id": message.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model").cloned().unwrap_or(Value::Null),
        "choices": [choice],
        "usage": chat_usage(message.get("usage")),
    })
}

/// An Anthropic error body in OpenAI's shape (its message kept; a body that is not one keeps
/// its text).
pub fn error(status: u16, body: &[u8]) -> Value {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let s = |p: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.pointer(p))
            .and_then(Value::as_str)
    };
    let message = s("/error/message").map(str::to_string).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            format!("the provider answered with status {status}")
        } else {
            text.chars().take(1000).collect()
        }
    });
    let kind = match s("/error/type") {
        Some("rate_limit_error") => "rate_limit_exceeded",
        Some("authentication_error" | "permission_error" | "not_found_error")
        | Some("invalid_request_error" | "request_too_large") => "invalid_request_error",
        _ => "api_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null,
                     "code": s("/error/type")}})
}

/// Turns the Messages stream's events into chat completion chunks.
#[derive(Debug)]
pub struct ChunkTranslator {
    id: Value,
    model: Value,
    created: u64,
    /// Block index → chat tool call index, for tool_use blocks.
    calls: Vec<(u64, u64)>,
    usage: Map<String, Value>,
    finished: bool,
}

/// What one event becomes: chunks to send (chat JSON values), and whether the stream ended
/// (`[DONE]` follows them).
#[derive(Debug, Default, PartialEq)]
pub struct Out {
    pub chunks: Vec<Value>,
    pub done: bool,
}

impl ChunkTranslator {
    pub fn new(created: u64) -> ChunkTranslator {
        ChunkTranslator {
            id: Value::Null,
            model: Value::Null,
            created,
            calls: Vec::new(),
            usage: Map::new(),
            finished: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    /// The chunks one event's data makes (`data` is the event's JSON; its `type` says which).
    pub fn event(&mut self, data: &Value) -> Out {
        let mut out = Out::default();
        if self.finished {
            return out;
        }
        let s = |p: &str| data.pointer(p).and_then(Value::as_str);
        match s("/type").unwrap_or("") {
            "message_start" => {
                let message = data.get("message");
                self.id = message
                    .and_then(|m| m.get("id"))
                    .cloned()
                    .unwrap_or(Value::Null);
                self.model = message
                    .and_then(|m| m.get("model"))
                    .cloned()
                    .unwrap_or(Value::Null);
                if let Some(u) = message
                    .and_then(|m| m.get("usage"))
                    .and_then(Value::as_object)
                {
                    self.usage.extend(u.clone());
                }
                out.chunks
                    .push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
            }
            "content_block_start" => {
                let block = data.get("content_block");
                let b = |k: &str| block.and_then(|b| b.get(k)).and_then(Value::as_str);
                if b("type") == Some("tool_use") {
                    let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let call = self.calls.len() as u64;
                    self.calls.push((index, call));
                    out.chunks.push(self.chunk(
                        json!({"tool_calls": [{"index": call, "id": b("id").unwrap_or(""),
                                               "type": "function",
                                               "function": {"name": b("name").unwrap_or(""), "arguments": ""}}]}),
                        Value::Null,
                    ));
                }
            }
            "content_block_delta" => {
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                let delta = match s("/delta/type") {
                    Some("text_delta") => s("/delta/text").map(|t| json!({"content": t})),
                    Some("thinking_delta") => {
                        s("/delta/thinking").map(|t| json!({"reasoning_content": t}))
                    }
                    Some("input_json_delta") => {
                        let call = self
                            .calls
                            .iter()
                            .find(|(b, _)| *b == index)
                            .map(|(_, c)| *c);
                        match (call, s("/delta/partial_json")) {
                            (Some(call), Some(args)) if !args.is_empty() => Some(
                                json!({"tool_calls": [{"index": call, "function": {"arguments": args}}]}),
                            ),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                if let Some(delta) = delta {
                    out.chunks.push(self.chunk(delta, Value::Null));
                }
            }
            "message_delta" => {
                if let Some(u) = data.get("usage").and_then(Value::as_object) {
                    // Cumulative counts: the later value wins.
                    self.usage.extend(u.clone());
                }
                let stop = s("/delta/stop_reason");
                let mut chunk = self.chunk(json!({}), finish_reason(stop));
                if let (Some("stop_sequence"), Some(seq)) = (stop, s("/delta/stop_sequence")) {
                    if let Some(c) = chunk
                        .pointer_mut("/choices/0")
                        .and_then(Value::as_object_mut)
                    {
                        c.insert("stop_reason".into(), Value::from(seq));
                    }
                }
                out.chunks.push(chunk);
            }
            "message_stop" => {
                let usage = chat_usage(Some(&Value::Object(self.usage.clone())));
                out.chunks
                    .push(json!({"id": self.id, "object": "chat.completion.chunk",
                                       "created": self.created, "model": self.model,
                                       "choices": [], "usage": usage}));
                out.done = true;
                self.finished = true;
            }
            "error" => {
                let message = s("/error/message").unwrap_or("the provider failed");
                out.chunks
                    .push(json!({"error": {"message": message, "type": "api_error",
                                                 "code": s("/error/type")}}));
                self.finished = true;
            }
            // `ping`, `content_block_stop`, and event types added later.
            _ => {}
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_become_messages_requests() {
        let chat = json!({"model": "fast", "max_tokens": 50, "temperature": 0.3, "stream": true,
            "stream_options": {"include_usage": true}, "stop": "END", "user": "u1", "seed": 4,
            "parallel_tool_calls": false, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "weather", "description": "d",
                       "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                {"role": "tool", "tool_call_id": "c2", "content": "25C"},
                {"role": "user", "content": "Thanks"}]});
        let (body, dropped) = request(&chat, "claude-x").unwrap();
        assert_eq!(
            body,
            json!({"model": "claude-x", "system": "Be brief.", "max_tokens": 50, "temperature": 0.3,
                   "stream": true, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
                   "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}],
                   "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                   "messages": [
                       {"role": "user", "content": [{"type": "text", "text": "Look:"},
                           {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]},
                       {"role": "assistant", "content": [
                           {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Paris"}},
                           {"type": "tool_use", "id": "c2", "name": "weather", "input": {"city": "Rome"}}]},
                       {"role": "user", "content": [
                           {"type": "tool_result", "tool_use_id": "c1", "content": "18C"},
                           {"type": "tool_result", "tool_use_id": "c2", "content": "25C"},
                           {"type": "text", "text": "Thanks"}]}]})
        );
        assert_eq!(dropped, vec!["seed"]);
        let (plain, _) = request(
            &json!({"messages": [{"role": "user", "content": "x"}]}),
            "m",
        )
        .unwrap();
        assert_eq!(plain["max_tokens"], DEFAULT_MAX_TOKENS);
        assert!(request(
            &json!({"messages": [{"role": "system", "content": "x"}]}),
            "m"
        )
        .is_err());
        assert!(request(
            &json!({"n": 2, "messages": [{"role": "user", "content": "x"}]}),
            "m"
        )
        .is_err());
    }

    #[test]
    fn a_message_becomes_a_chat_completion() {
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 4}});
        assert_eq!(
            answer(&message, 7),
            json!({"id": "msg_1", "object": "chat.completion", "created": 7, "model": "claude-x",
                   "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                       "role": "assistant", "content": "Checking.", "reasoning_content": "hm",
                       "tool_calls": [{"id": "t1", "type": "function",
                                       "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
                   "usage": {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19,
                             "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0}}})
        );
        let stopped = json!({"content": [{"type": "text", "text": "a"}], "stop_reason": "stop_sequence", "stop_sequence": "END"});
        let c = answer(&stopped, 0);
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert_eq!(c["choices"][0]["stop_reason"], "END");
    }

    #[test]
    fn the_messages_stream_becomes_chat_chunks() {
        let events = [
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "content": [],
                   "usage": {"input_tokens": 12, "output_tokens": 1}}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\""}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ":\"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ];
        let mut t = ChunkTranslator::new(5);
        let mut chunks = Vec::new();
        let mut done = false;
        for e in &events {
            let out = t.event(e);
            chunks.extend(out.chunks);
            done |= out.done;
        }
        assert!(done);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/delta"))
            .collect();
        assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
        assert_eq!(deltas[1], &json!({"content": "Hi"}));
        assert_eq!(
            deltas[2],
            &json!({"tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "weather", "arguments": ""}}]})
        );
        assert_eq!(
            deltas[3]["tool_calls"][0]["function"]["arguments"],
            "{\"city\""
        );
        assert_eq!(
            deltas[4]["tool_calls"][0]["function"]["arguments"],
            ":\"Paris\"}"
        );
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "tool_calls");
        let last = chunks.last().unwrap();
        assert_eq!(last["usage"]["prompt_tokens"], 12);
        assert_eq!(last["usage"]["completion_tokens"], 9);
        assert_eq!(last["id"], "msg_1");
        // Nothing after the end.
        assert_eq!(t.event(&json!({"type": "message_stop"})), Out::default());
    }

    #[test]
    fn errors_become_openai_errors() {
        let e = error(
            429,
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#,
        );
        assert_eq!(e["error"]["message"], "slow");
        assert_eq!(e["error"]["type"], "rate_limit_exceeded");
        assert_eq!(error(529, b"")["error"]["type"], "api_error");
        let mut t = ChunkTranslator::new(0);
        let out = t.event(
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
        );
        assert_eq!(out.chunks[0]["error"]["message"], "busy");
        assert!(!out.done);
    }
}
