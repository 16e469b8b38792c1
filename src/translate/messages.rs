//! Anthropic's Messages API over a Chat Completions target.
//!
//! - [`to_chat`]: a `POST /v1/messages` body → a chat completions body, and the fields it had
//!   to leave out.
//! - [`from_chat`]: a chat completion → a `message` object.
//! - [`StreamTranslator`]: chat completion chunks → the Messages stream's events
//!   (`message_start`, `ping`, `content_block_start` / `_delta` / `_stop`, `message_delta`,
//!   `message_stop`). Text and tool input go out as they arrive (`text_delta`,
//!   `input_json_delta`); a failure after the first event is an `error` event.
//! - [`error_body`]: an error in Anthropic's shape, `{"type":"error","error":{"type","message"}}`.
//!
//! Anthropic's blocks come one after another (one open at a time), where chat streams tool
//! calls by index: a call's block opens when its first delta arrives and the block before it
//! closes then. A provider that goes back to a call it left (interleaved arguments, which no
//! known provider sends) fails the stream with an `error` event rather than lose arguments.

use serde_json::{json, Map, Value};

use super::{ChatUsage, Event, TranslateError};

/// A chat completions body, and the Messages fields it does not carry (for a response header
/// saying so).
#[derive(Debug, Clone, PartialEq)]
pub struct ToChat {
    pub body: Value,
    pub dropped: Vec<&'static str>,
}

/// Fields a translated request leaves out: chat completions has no place for them.
const DROPPED: [&str; 4] = ["top_k", "thinking", "service_tier", "container"];

/// Most output blocks one streamed answer may open (each tool call is one).
const MAX_BLOCKS: usize = 128;

/// Translates a Messages request to a chat completions request. `counting`: the body of a
/// `count_tokens` request, which has no `max_tokens`.
pub fn to_chat(request: &Value, counting: bool) -> Result<ToChat, TranslateError> {
    let req = request
        .as_object()
        .ok_or_else(|| TranslateError::invalid("body", "must be a JSON object"))?;
    let mut chat = Map::new();
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| TranslateError::invalid("model", "must be a non-empty string"))?;
    chat.insert("model".into(), Value::from(model));

    let mut messages = Vec::new();
    match req.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let text = joined_text(blocks, "system")?;
            messages.push(json!({"role": "system", "content": text}));
        }
        Some(_) => {
            return Err(TranslateError::invalid(
                "system",
                "must be a string or a list of text blocks",
            ))
        }
    }
    let turns = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| TranslateError::invalid("messages", "must be a list of messages"))?;
    if turns.is_empty() {
        return Err(TranslateError::invalid("messages", "must not be empty"));
    }
    for (i, turn) in turns.iter().enumerate() {
        push_turn(&mut messages, turn, &format!("messages[{i}]"))?;
    }
    chat.insert("messages".into(), Value::Array(messages));

    match req.get("max_tokens") {
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            chat.insert("max_tokens".into(), Value::Number(n.clone()));
        }
        None | Some(Value::Null) if counting => {}
        None | Some(Value::Null) => {
            return Err(TranslateError::invalid("max_tokens", "is required"));
        }
        Some(_) => {
            return Err(TranslateError::invalid(
                "max_tokens",
                "must be a non-negative integer",
            ))
        }
    }
    if let Some(tools) = req.get("tools").filter(|t| !t.is_null()) {
        let tools = tools
            .as_array()
            .ok_or_else(|| TranslateError::invalid("tools", "must be a list"))?;
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| chat_tool(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        if !tools.is_empty() {
            chat.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = req.get("tool_choice").filter(|t| !t.is_null()) {
        let (choice, parallel) = chat_tool_choice(choice)?;
        if let Some(choice) = choice {
            chat.insert("tool_choice".into(), choice);
        }
        if !parallel {
            chat.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    match req.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => {
            if !stops.is_empty() {
                chat.insert("stop".into(), Value::Array(stops.clone()));
            }
        }
        Some(_) => {
            return Err(TranslateError::invalid(
                "stop_sequences",
                "must be a list of strings",
            ))
        }
    }
    for field in ["temperature", "top_p"] {
        match req.get(field) {
            None | Some(Value::Null) => {}
            Some(v @ Value::Number(_)) => {
                chat.insert(field.into(), v.clone());
            }
            Some(_) => return Err(TranslateError::invalid(field, "must be a number")),
        }
    }
    if let Some(user) = request.pointer("/metadata/user_id").and_then(Value::as_str) {
        chat.insert("user".into(), Value::from(user));
    }
    match req.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            chat.insert("stream".into(), Value::Bool(true));
            // A Messages stream ends with the usage: a chat stream sends it only when asked.
            chat.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Some(_) => return Err(TranslateError::invalid("stream", "must be a boolean")),
    }
    Ok(ToChat {
        body: Value::Object(chat),
        dropped: dropped_fields(request),
    })
}

/// The fields of `request` a translated request leaves out.
pub fn dropped_fields(request: &Value) -> Vec<&'static str> {
    DROPPED
        .iter()
        .copied()
        .filter(|f| request.get(*f).is_some_and(|v| !v.is_null()))
        .collect()
}

/// One Messages turn as chat messages. A user turn's `tool_result` blocks become `tool`
/// messages, first (chat wants them right after the assistant's calls); the rest of the turn
/// follows as one user message. An assistant turn's `tool_use` blocks become its tool calls;
/// its `thinking` blocks are left out (chat targets take no reasoning input).
fn push_turn(messages: &mut Vec<Value>, turn: &Value, at: &str) -> Result<(), TranslateError> {
    let role = turn
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| TranslateError::invalid(format!("{at}.role"), "is required"))?;
    let blocks = match turn.get("content") {
        Some(Value::String(s)) => {
            return match role {
                "user" | "assistant" => {
                    messages.push(json!({"role": role, "content": s}));
                    Ok(())
                }
                _ => Err(bad_role(at)),
            }
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(TranslateError::invalid(
                format!("{at}.content"),
                "must be a string or a list of content blocks",
            ))
        }
    };
    match role {
        "user" => {
            let mut parts = Vec::new();
            for (i, block) in blocks.iter().enumerate() {
                let here = format!("{at}.content[{i}]");
                match block_type(block) {
                    "text" => {
                        parts.push(json!({"type": "text", "text": text_field(block, &here)?}))
                    }
                    "image" => parts.push(image_part(block, &here)?),
                    "tool_result" => messages.push(tool_message(block, &here)?),
                    other => return Err(unsupported_block(other, &here)),
                }
            }
            if !parts.is_empty() {
                messages.push(json!({"role": "user", "content": parts}));
            }
        }
        "assistant" => {
            let mut text = String::new();
            let mut calls = Vec::new();
            for (i, block) in blocks.iter().enumerate() {
                let here = format!("{at}.content[{i}]");
                match block_type(block) {
                    "text" => text.push_str(text_field(block, &here)?),
                    "tool_use" => calls.push(tool_call(block, &here)?),
                    // The model's own reasoning from an earlier turn: a chat target takes
                    // none, and replaying it as text would change the conversation.
                    "thinking" | "redacted_thinking" => {}
                    other => return Err(unsupported_block(other, &here)),
                }
            }
            let mut message = Map::new();
            message.insert("role".into(), json!("assistant"));
            message.insert(
                "content".into(),
                if text.is_empty() && !calls.is_empty() {
                    Value::Null
                } else {
                    Value::String(text)
                },
            );
            if !calls.is_empty() {
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            messages.push(Value::Object(message));
        }
        _ => return Err(bad_role(at)),
    }
    Ok(())
}

fn bad_role(at: &str) -> TranslateError {
    TranslateError::invalid(format!("{at}.role"), "must be `user` or `assistant`")
}

fn block_type(block: &Value) -> &str {
    block.get("type").and_then(Value::as_str).unwrap_or("")
}

fn text_field<'a>(block: &'a Value, at: &str) -> Result<&'a str, TranslateError> {
    block
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| TranslateError::invalid(format!("{at}.text"), "must be a string"))
}

fn unsupported_block(kind: &str, at: &str) -> TranslateError {
    TranslateError::unsupported(
        format!("{at}.type"),
        format!("`{kind}` blocks need a target that speaks the Messages API"),
    )
}

/// The text of a list of text blocks (a `system` prompt, a tool result), joined by newlines.
fn joined_text(blocks: &[Value], at: &str) -> Result<String, TranslateError> {
    let mut text = String::new();
    for (i, block) in blocks.iter().enumerate() {
        let here = format!("{at}[{i}]");
        if block_type(block) != "text" {
            return Err(TranslateError::invalid(here, "must be a text block here"));
        }
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(text_field(block, &here)?);
    }
    Ok(text)
}

/// An `image` block as a chat `image_url` part: base64 data as a data: URL, a URL as is.
fn image_part(block: &Value, at: &str) -> Result<Value, TranslateError> {
    let source = block
        .get("source")
        .ok_or_else(|| TranslateError::invalid(format!("{at}.source"), "is required"))?;
    let s = |name: &str| source.get(name).and_then(Value::as_str);
    let url = match s("type") {
        Some("base64") => match (s("media_type"), s("data")) {
            (Some(media), Some(data)) => format!("data:{media};base64,{data}"),
            _ => {
                return Err(TranslateError::invalid(
                    format!("{at}.source"),
                    "a base64 image needs `media_type` and `data`",
                ))
            }
        },
        Some("url") => s("url")
            .ok_or_else(|| TranslateError::invalid(format!("{at}.source.url"), "is required"))?
            .to_string(),
        _ => {
            return Err(TranslateError::unsupported(
                format!("{at}.source.type"),
                "images are passed as `base64` or `url`; `file` needs a target that speaks the Messages API",
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A `tool_result` block as a chat `tool` message. Its content is text (a string or text
/// blocks); an error result says so in the text, as chat has no flag for it.
fn tool_message(block: &Value, at: &str) -> Result<Value, TranslateError> {
    let id = block
        .get("tool_use_id")
        .and_then(Value::as_str)
        .ok_or_else(|| TranslateError::invalid(format!("{at}.tool_use_id"), "must be a string"))?;
    let mut content = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => joined_text(blocks, &format!("{at}.content"))?,
        Some(_) => {
            return Err(TranslateError::invalid(
                format!("{at}.content"),
                "must be a string or a list of text blocks",
            ))
        }
    };
    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        content.insert_str(0, "Error: ");
    }
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

/// A `tool_use` block as a chat tool call (its input as a JSON string).
fn tool_call(block: &Value, at: &str) -> Result<Value, TranslateError> {
    let field = |name: &str| {
        block
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| TranslateError::invalid(format!("{at}.{name}"), "must be a string"))
    };
    let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
    Ok(json!({
        "id": field("id")?,
        "type": "function",
        "function": {"name": field("name")?, "arguments": input.to_string()},
    }))
}

/// A Messages client tool (`name`, `description`, `input_schema`) as a chat function tool.
/// Anthropic's server tools (web search, code execution, bash…) run at Anthropic.
fn chat_tool(tool: &Value, i: usize) -> Result<Value, TranslateError> {
    let at = format!("tools[{i}]");
    match tool.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(other) => {
            return Err(TranslateError::unsupported(
                format!("{at}.type"),
                format!("`{other}` tools need a target that speaks the Messages API; client tools work everywhere"),
            ))
        }
    }
    let name = tool
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| TranslateError::invalid(format!("{at}.name"), "must be a string"))?;
    let schema = tool
        .get("input_schema")
        .filter(|s| s.is_object())
        .ok_or_else(|| {
            TranslateError::invalid(format!("{at}.input_schema"), "must be an object")
        })?;
    let mut function = Map::new();
    function.insert("name".into(), Value::from(name));
    if let Some(d) = tool.get("description").filter(|d| !d.is_null()) {
        function.insert("description".into(), d.clone());
    }
    function.insert("parameters".into(), schema.clone());
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice` in chat terms, and whether parallel calls stay allowed.
fn chat_tool_choice(choice: &Value) -> Result<(Option<Value>, bool), TranslateError> {
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        != Some(true);
    let chat = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| TranslateError::invalid("tool_choice.name", "must be a string"))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(TranslateError::invalid(
                "tool_choice.type",
                "must be `auto`, `any`, `tool` or `none`",
            ))
        }
    };
    Ok((Some(chat), parallel))
}

/// What a `message` says besides its content: its id and the model asked for.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `msg_…`; tool use ids come from the provider.
    pub id: String,
    pub model: String,
}

impl Meta {
    pub fn new(id: String, request: &Value) -> Meta {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Meta { id, model }
    }
}

/// A chat `finish_reason` as a Messages `stop_reason` (and the stop sequence that matched,
/// when the provider says which: vLLM and llama.cpp put it in the choice's `stop_reason`).
fn stop_reason(finish_reason: Option<&str>, matched: Option<&str>) -> (&'static str, Value) {
    match (finish_reason, matched) {
        (Some("stop"), Some(seq)) => ("stop_sequence", Value::from(seq)),
        (Some("length"), _) => ("max_tokens", Value::Null),
        (Some("tool_calls" | "function_call"), _) => ("tool_use", Value::Null),
        (Some("content_filter"), _) => ("refusal", Value::Null),
        _ => ("end_turn", Value::Null),
    }
}

/// A chat `usage` in Messages terms. Anthropic counts cache reads apart from `input_tokens`.
fn usage(chat_usage: Option<&Value>) -> Value {
    let u = ChatUsage::of(chat_usage);
    json!({
        "input_tokens": u.input.saturating_sub(u.cached.saturating_add(u.cache_written)),
        "output_tokens": u.output,
        "cache_read_input_tokens": u.cached,
        "cache_creation_input_tokens": u.cache_written,
    })
}

/// A chat completion (non-streaming) as a `message`: the first choice's reasoning (when the
/// provider returns it) as a `thinking` block, its text as a `text` block, its tool calls as
/// `tool_use` blocks.
pub fn from_chat(chat: &Value, meta: &Meta) -> Value {
    let choice = super::first_choice(chat);
    let message = choice.and_then(|c| c.get("message"));
    fn s<'a>(v: Option<&'a Value>, name: &str) -> Option<&'a str> {
        v.and_then(|m| m.get(name)).and_then(Value::as_str)
    }
    let mut content = Vec::new();
    if let Some(thinking) = s(message, "reasoning_content").filter(|t| !t.is_empty()) {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
    }
    let text = s(message, "content").or_else(|| s(message, "refusal"));
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = message
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for call in calls {
        let s = |p: &str| call.pointer(p).and_then(Value::as_str).unwrap_or("");
        content.push(json!({
            "type": "tool_use",
            "id": s("/id"),
            "name": s("/function/name"),
            "input": tool_input(s("/function/arguments")),
        }));
    }
    let (stop, sequence) = stop_reason(
        s(choice, "finish_reason"),
        s(choice, "stop_reason").or_else(|| s(choice, "stop")),
    );
    // Some providers say `stop` for an answer that calls tools: the client's loop needs
    // `tool_use` to run them.
    let stop = if !calls.is_empty() && stop == "end_turn" {
        "tool_use"
    } else {
        stop
    };
    json!({
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": sequence,
        "usage": usage(chat.get("usage")),
    })
}

/// A tool call's arguments as the `input` object Anthropic requires. Arguments that are not a
/// JSON object (a small model's broken JSON) are kept whole under `arguments`, not lost.
fn tool_input(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"arguments": arguments}),
    }
}

/// The block open in a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    Thinking,
    Text,
    /// A tool call, by its chat `index`.
    Tool(u64),
}

/// Turns chat completion chunks into Messages stream events.
#[derive(Debug)]
pub struct StreamTranslator {
    meta: Meta,
    started: bool,
    /// The open block and its index.
    open: Option<(Block, usize)>,
    /// Blocks opened so far (the next one's index).
    blocks: usize,
    /// Chat tool call indexes whose blocks were closed.
    closed_calls: Vec<u64>,
    /// Which call each tool-call delta belongs to.
    call_keys: super::CallKeys,
    finish_reason: Option<String>,
    matched_stop: Option<String>,
    usage: Option<Value>,
    finished: bool,
}

/// A `content_block_delta` event, written from the chunk's own strings (the most frequent
/// event: one per provider chunk).
#[derive(serde::Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: Delta<'a>,
}

#[derive(serde::Serialize)]
#[serde(tag = "type")]
enum Delta<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

impl StreamTranslator {
    pub fn new(meta: Meta) -> StreamTranslator {
        StreamTranslator {
            meta,
            started: false,
            open: None,
            blocks: 0,
            closed_calls: Vec::new(),
            call_keys: super::CallKeys::default(),
            finish_reason: None,
            matched_stop: None,
            usage: None,
            finished: false,
        }
    }

    /// `message_start` and a `ping`, once, before anything else. Usage is not known yet (chat
    /// streams report it last): `message_delta` carries it, input tokens included.
    pub fn start(&mut self, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": self.meta.id, "type": "message", "role": "assistant", "model": self.meta.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        out.push(Event::new(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ));
        out.push(Event::new("ping", &json!({"type": "ping"})));
    }

    /// The events one chat chunk makes.
    pub fn chunk(&mut self, chunk: &Value, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.start(out);
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = super::first_choice(chunk) else {
            return;
        };
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_string());
        }
        if let Some(seq) = choice.get("stop_reason").and_then(Value::as_str) {
            self.matched_stop = Some(seq.to_string());
        }
        let Some(delta) = choice.get("delta") else {
            return;
        };
        let text = |name: &str| {
            delta
                .get(name)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
        };
        if let Some(thinking) = text("reasoning_content") {
            if self.enter(Block::Thinking, None, out) {
                self.delta(Delta::Thinking { thinking }, out);
            }
        }
        if let Some(t) = text("content") {
            if self.enter(Block::Text, None, out) {
                self.delta(Delta::Text { text: t }, out);
            }
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                let key = self.call_keys.key(call);
                let args = call
                    .get("function")
                    .and_then(|f| f.get("arguments"))
                    .and_then(Value::as_str)
                    .filter(|a| !a.is_empty());
                if args.is_none() && self.closed_calls.contains(&key) {
                    // Back to a call it left, with nothing for it: nothing lost.
                    continue;
                }
                if !self.enter(Block::Tool(key), Some(call), out) {
                    return;
                }
                if let Some(args) = args {
                    self.delta(Delta::InputJson { partial_json: args }, out);
                }
            }
        }
    }

    /// Makes `block` the open block (closing the one before it). `false` when the stream
    /// failed instead (too many blocks, or a call the stream had already left).
    fn enter(&mut self, block: Block, call: Option<&Value>, out: &mut Vec<Event>) -> bool {
        if self.open.is_some_and(|(b, _)| b == block) {
            return true;
        }
        if let Block::Tool(key) = block {
            if self.closed_calls.contains(&key) {
                self.fail(
                    "the provider went back to a tool call it had left (interleaved arguments)",
                    out,
                );
                return false;
            }
        }
        if self.blocks >= MAX_BLOCKS {
            self.fail("the provider's answer opened too many content blocks", out);
            return false;
        }
        self.close(out);
        let index = self.blocks;
        self.blocks = self.blocks.saturating_add(1);
        let content_block = match block {
            Block::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Block::Text => json!({"type": "text", "text": ""}),
            Block::Tool(_) => {
                let s = |p: &str| {
                    call.and_then(|c| c.pointer(p))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                };
                json!({"type": "tool_use", "id": s("/id"), "name": s("/function/name"), "input": {}})
            }
        };
        out.push(Event::new(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": content_block}),
        ));
        self.open = Some((block, index));
        true
    }

    fn delta(&mut self, delta: Delta<'_>, out: &mut Vec<Event>) {
        if let Some((_, index)) = self.open {
            out.push(Event::new(
                "content_block_delta",
                &BlockDelta {
                    kind: "content_block_delta",
                    index,
                    delta,
                },
            ));
        }
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((block, index)) = self.open.take() {
            if let Block::Tool(key) = block {
                self.closed_calls.push(key);
            }
            out.push(Event::new(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Closes the open block and ends the stream: `message_delta` (stop reason and usage) and
    /// `message_stop`. Call on `[DONE]`.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.start(out);
        self.close(out);
        let (stop, sequence) =
            stop_reason(self.finish_reason.as_deref(), self.matched_stop.as_deref());
        let stop = if !self.closed_calls.is_empty() && stop == "end_turn" {
            "tool_use"
        } else {
            stop
        };
        self.finished = true;
        out.push(Event::new(
            "message_delta",
            &json!({"type": "message_delta",
                   "delta": {"stop_reason": stop, "stop_sequence": sequence},
                   "usage": usage(self.usage.as_ref())}),
        ));
        out.push(Event::new("message_stop", &json!({"type": "message_stop"})));
    }

    /// Ends the stream with an `error` event: the target failed after the first event.
    pub fn fail(&mut self, message: &str, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.start(out);
        self.finished = true;
        out.push(Event::new("error", &error_body(500, message)));
    }

    /// Whether the stream has ended (stopped or failed).
    pub fn finished(&self) -> bool {
        self.finished
    }
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// An error in Anthropic's shape.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// A provider's (or the gateway's) OpenAI-shaped error body in Anthropic's shape: its message
/// kept, its type from the status. A body that is not an OpenAI error keeps its text as the
/// message.
pub fn error_from_openai(status: u16, body: &[u8]) -> Value {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .or_else(|| v.get("message"))
        })
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("the provider answered with status {status}")
            } else {
                text.chars().take(1000).collect()
            }
        });
    error_body(status, &message)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Requests as the official `anthropic` SDK sends them, and the chat requests they become.
    #[test]
    fn requests_become_chat_requests() {
        let cases = [
            (
                "a string system prompt, sampling, stop sequences, the user id",
                json!({"model": "m", "max_tokens": 64, "system": "Be brief.",
                       "messages": [{"role": "user", "content": "Hi"}],
                       "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
                       "metadata": {"user_id": "u1"}}),
                json!({"model": "m", "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"}],
                       "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "stop": ["END"],
                       "user": "u1"}),
            ),
            (
                "a tool round trip: calls, results first in the next user turn, thinking left out",
                json!({"model": "m", "max_tokens": 10,
                       "system": [{"type": "text", "text": "Use tools."},
                                  {"type": "text", "text": "Be exact.", "cache_control": {"type": "ephemeral"}}],
                       "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather in Paris?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "t2", "name": "time", "input": {}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "t2", "is_error": true,
                         "content": [{"type": "text", "text": "no clock"}]},
                        {"type": "text", "text": "Thanks."}]}]}),
                json!({"model": "m", "max_tokens": 10, "messages": [
                    {"role": "system", "content": "Use tools.\nBe exact."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather in Paris?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "t1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "t2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "t1", "content": "18C"},
                    {"role": "tool", "tool_call_id": "t2", "content": "Error: no clock"},
                    {"role": "user", "content": [{"type": "text", "text": "Thanks."}]}]}),
            ),
            (
                "tools, a forced tool without parallel calls, streaming",
                json!({"model": "m", "max_tokens": 5, "stream": true,
                       "messages": [{"role": "user", "content": "x"}],
                       "tools": [{"name": "f", "description": "d",
                                  "input_schema": {"type": "object", "properties": {}}}],
                       "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": true}}),
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                       "stream": true, "stream_options": {"include_usage": true},
                       "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                  "parameters": {"type": "object", "properties": {}}}}],
                       "tool_choice": {"type": "function", "function": {"name": "f"}},
                       "parallel_tool_calls": false}),
            ),
            (
                "any tool, an assistant that only calls",
                json!({"model": "m", "max_tokens": 5, "tool_choice": {"type": "any"},
                       "messages": [{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {"k": 1}}]}]}),
                json!({"model": "m", "max_tokens": 5, "tool_choice": "required", "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"k\":1}"}}]}]}),
            ),
        ];
        for (name, request, chat) in cases {
            let got = to_chat(&request, false).unwrap();
            assert_eq!(got.body, chat, "{name}");
            assert!(got.dropped.is_empty(), "{name}: {:?}", got.dropped);
        }
    }

    #[test]
    fn fields_chat_cannot_carry_are_dropped_and_named() {
        let request = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                             "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024}});
        let got = to_chat(&request, false).unwrap();
        assert_eq!(got.dropped, vec!["top_k", "thinking"]);
        assert!(got.body.get("top_k").is_none() && got.body.get("thinking").is_none());
    }

    #[test]
    fn requests_a_chat_target_cannot_serve_are_refused_with_the_field() {
        let msgs = json!([{"role": "user", "content": "x"}]);
        let cases = [
            (json!({"model": "m", "messages": msgs}), "max_tokens", false),
            (
                json!({"model": "m", "max_tokens": -1, "messages": msgs}),
                "max_tokens",
                false,
            ),
            (json!({"model": "m", "max_tokens": 1}), "messages", false),
            (
                json!({"model": "m", "max_tokens": 1, "messages": []}),
                "messages",
                false,
            ),
            (json!({"max_tokens": 1, "messages": msgs}), "model", false),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
                false,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
                "messages[0].content[0].type",
                true,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": msgs,
                       "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools[0].type",
                true,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": msgs, "tools": [{"name": "f"}]}),
                "tools[0].input_schema",
                false,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": msgs, "tool_choice": {"type": "maybe"}}),
                "tool_choice.type",
                false,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": msgs, "stop_sequences": "END"}),
                "stop_sequences",
                false,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                    {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}),
                "messages[0].content[0].source.type",
                true,
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": msgs, "stream": "yes"}),
                "stream",
                false,
            ),
        ];
        for (request, field, unsupported) in cases {
            let err = to_chat(&request, false).unwrap_err();
            assert_eq!(err.field(), field, "{request}");
            assert_eq!(
                matches!(err, TranslateError::Unsupported { .. }),
                unsupported,
                "{request}: {err}"
            );
        }
        // A count_tokens body has no max_tokens.
        assert!(to_chat(&json!({"model": "m", "messages": msgs}), true).is_ok());
    }

    fn meta() -> Meta {
        Meta::new("msg_1".into(), &json!({"model": "claude-ish"}))
    }

    #[test]
    fn a_chat_answer_becomes_a_message() {
        let chat = json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Calling.", "reasoning_content": "think",
                        "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "t2", "type": "function", "function": {"name": "time", "arguments": "not json"}}]},
            "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37,
                      "prompt_tokens_details": {"cached_tokens": 10}}});
        assert_eq!(
            from_chat(&chat, &meta()),
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-ish",
                   "content": [
                       {"type": "thinking", "thinking": "think", "signature": ""},
                       {"type": "text", "text": "Calling."},
                       {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}},
                       {"type": "tool_use", "id": "t2", "name": "time", "input": {"arguments": "not json"}}],
                   "stop_reason": "tool_use", "stop_sequence": null,
                   "usage": {"input_tokens": 20, "output_tokens": 7,
                             "cache_read_input_tokens": 10, "cache_creation_input_tokens": 0}})
        );
    }

    #[test]
    fn stop_reasons_map_and_usage_is_never_missing() {
        let answer = |finish: Value, extra: Value| {
            let mut choice = json!({"index": 0, "message": {"role": "assistant", "content": "x"},
                                    "finish_reason": finish});
            for (k, v) in extra.as_object().unwrap() {
                choice[k] = v.clone();
            }
            from_chat(&json!({"choices": [choice]}), &meta())
        };
        assert_eq!(answer(json!("stop"), json!({}))["stop_reason"], "end_turn");
        let called = from_chat(
            &json!({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                "content": null, "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}),
            &meta(),
        );
        assert_eq!(called["stop_reason"], "tool_use", "tool calls said `stop`");
        assert_eq!(
            answer(json!("length"), json!({}))["stop_reason"],
            "max_tokens"
        );
        assert_eq!(
            answer(json!("content_filter"), json!({}))["stop_reason"],
            "refusal"
        );
        let m = answer(json!("stop"), json!({"stop_reason": "END"}));
        assert_eq!(
            (&m["stop_reason"], &m["stop_sequence"]),
            (&json!("stop_sequence"), &json!("END"))
        );
        assert_eq!(
            answer(json!(null), json!({}))["usage"],
            json!({"input_tokens": 0, "output_tokens": 0,
                   "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0})
        );
    }

    fn chunk(delta: Value, finish: Option<&str>) -> Value {
        json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    fn run(chunks: &[Value]) -> Vec<(&'static str, Value)> {
        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        for c in chunks {
            t.chunk(c, &mut out);
        }
        t.finish(&mut out);
        crate::translate::pairs(&out)
    }

    #[test]
    fn a_chat_stream_becomes_the_messages_event_sequence() {
        let events = run(&[
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"reasoning_content": "hm"}), None),
            chunk(json!({"content": "Let me "}), None),
            chunk(json!({"content": "check."}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "t1", "type": "function",
                                         "function": {"name": "weather", "arguments": ""}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "t2", "type": "function",
                                         "function": {"name": "time", "arguments": "{}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
            json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}),
        ]);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for (kind, data) in &events {
            assert_eq!(data["type"], *kind, "every event names its type");
        }
        assert_eq!(events[2].1["content_block"]["type"], "thinking");
        assert_eq!(
            events[5].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(
            events[9].1,
            json!({"type": "content_block_start", "index": 2, "content_block":
                   {"type": "tool_use", "id": "t1", "name": "weather", "input": {}}})
        );
        // The arguments go out in the pieces they came in.
        assert_eq!(
            events[10].1["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
        );
        assert_eq!(events[11].1["delta"]["partial_json"], "\"Paris\"}");
        assert_eq!(events[13].1["index"], 3);
        assert_eq!(
            events[16].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                   "usage": {"input_tokens": 12, "output_tokens": 9,
                             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}})
        );
    }

    #[test]
    fn a_failed_stream_ends_with_one_error_event() {
        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        t.chunk(&chunk(json!({"content": "Hi"}), None), &mut out);
        t.fail("upstream broke", &mut out);
        t.fail("again", &mut out);
        t.finish(&mut out);
        let out = crate::translate::pairs(&out);
        let (kind, data) = out.last().unwrap();
        assert_eq!(*kind, "error");
        assert_eq!(
            data,
            &json!({"type": "error", "error": {"type": "api_error", "message": "upstream broke"}})
        );
        assert_eq!(out.iter().filter(|(k, _)| *k == "error").count(), 1);
        assert!(out.iter().all(|(k, _)| *k != "message_stop"));

        // A provider that goes back to a call it left fails rather than lose arguments.
        let events = run(&[
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}),
                None,
            ),
        ]);
        assert_eq!(events.last().unwrap().0, "error");
    }

    #[test]
    fn tool_calls_streamed_without_an_index_stay_apart() {
        // Some OpenAI-compatible providers leave `index` out of tool-call deltas.
        let events = run(&[
            chunk(
                json!({"tool_calls": [{"id": "c1", "function": {"name": "a", "arguments": "{\"x\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"function": {"arguments": "1}"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"id": "c2", "function": {"name": "b", "arguments": "{}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
        ]);
        let starts: Vec<&Value> = events
            .iter()
            .filter(|(k, _)| *k == "content_block_start")
            .map(|(_, v)| &v["content_block"])
            .collect();
        assert_eq!(starts.len(), 2, "{events:?}");
        assert_eq!(
            (&starts[0]["id"], &starts[0]["name"]),
            (&json!("c1"), &json!("a"))
        );
        assert_eq!(
            (&starts[1]["id"], &starts[1]["name"]),
            (&json!("c2"), &json!("b"))
        );
        let args: Vec<&Value> = events
            .iter()
            .filter(|(k, v)| *k == "content_block_delta" && v["index"] == 0)
            .map(|(_, v)| &v["delta"]["partial_json"])
            .collect();
        assert_eq!(args, [&json!("{\"x\":"), &json!("1}")]);
    }

    #[test]
    fn a_stream_opening_too_many_blocks_fails_once() {
        let chunks: Vec<Value> = (0..200)
            .map(|i| chunk(json!({"tool_calls": [{"index": i, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}), None))
            .collect();
        let events = run(&chunks);
        assert_eq!(events.iter().filter(|(k, _)| *k == "error").count(), 1);
        let opened = events
            .iter()
            .filter(|(k, _)| *k == "content_block_start")
            .count();
        assert_eq!(opened, MAX_BLOCKS);
    }

    #[test]
    fn errors_take_anthropics_shape() {
        assert_eq!(
            error_from_openai(
                429,
                br#"{"error":{"message":"slow down","type":"rate_limit_exceeded"}}"#
            ),
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
        );
        assert_eq!(
            error_from_openai(400, b"bad thing")["error"],
            json!({"type": "invalid_request_error", "message": "bad thing"})
        );
        assert_eq!(error_from_openai(502, b"")["error"]["type"], "api_error");
        for (status, kind) in [
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (500, "api_error"),
            (503, "api_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(error_type(status), kind, "{status}");
        }
    }
}
