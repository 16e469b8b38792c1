//! OpenAI's Responses API over a Chat Completions target.
//!
//! - [`to_chat`]: a `POST /v1/responses` body (with the items of an earlier turn, when the
//!   client continues one) → a chat completions body, and the fields it had to leave out.
//! - [`from_chat`]: a chat completion → a `response` object.
//! - [`StreamTranslator`]: chat completion chunks → the Responses stream's events, in the
//!   documented order, each with its `sequence_number`. Text and tool-call arguments go out as
//!   they arrive (never held to the end); the stream ends with `response.completed` (or
//!   `response.incomplete` when the answer was cut by `max_output_tokens`), or with
//!   `response.failed` when the target failed after the first event.
//!
//! Usage always carries `input_tokens_details` (`cached_tokens`, `cache_write_tokens`) and
//! `output_tokens_details.reasoning_tokens` (zero when the target reports none): clients that
//! read them (Codex) fail on a usage without them.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{ChatUsage, Event, TranslateError};

/// A chat completions body, and the Responses fields it does not carry (for a response
/// header saying so).
#[derive(Debug, Clone, PartialEq)]
pub struct ToChat {
    pub body: Value,
    pub dropped: Vec<&'static str>,
}

/// Fields a translated request leaves out: the chat API has no place for them, and a target
/// that rejects unknown fields would refuse the whole request.
const DROPPED: [&str; 6] = [
    "reasoning",
    "metadata",
    "truncation",
    "include",
    "service_tier",
    "prompt_cache_key",
];

/// Translates a Responses request to a chat completions request. `history` is the conversation
/// so far as Responses items (the stored input and output of `previous_response_id`), placed
/// before the request's own input; the request's `instructions` always come first (they are
/// not carried over from earlier turns, as in the Responses API).
pub fn to_chat(request: &Value, history: &[Value]) -> Result<ToChat, TranslateError> {
    let req = request
        .as_object()
        .ok_or_else(|| TranslateError::invalid("body", "must be a JSON object"))?;
    let mut chat = Map::new();
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| TranslateError::invalid("model", "must be a string"))?;
    chat.insert("model".into(), Value::from(model));

    let mut messages = Vec::new();
    match req.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(TranslateError::invalid("instructions", "must be a string")),
    }
    for (i, item) in history.iter().enumerate() {
        push_item(
            &mut messages,
            item,
            &format!("previous_response_id (item {i})"),
        )?;
    }
    match req.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                push_item(&mut messages, item, &format!("input[{i}]"))?;
            }
        }
        None | Some(Value::Null) if !history.is_empty() => {}
        _ => {
            return Err(TranslateError::invalid(
                "input",
                "must be a string or a list of items",
            ))
        }
    }
    if messages.is_empty() {
        return Err(TranslateError::invalid("input", "must not be empty"));
    }
    chat.insert("messages".into(), Value::Array(messages));

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
        chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    for (from, to) in [
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("max_output_tokens", "max_tokens"),
        ("user", "user"),
        ("stream", "stream"),
    ] {
        if let Some(v) = req.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        // Usage arrives in a last chunk only when asked for; a Responses stream must end with it.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(format) = req.get("text").and_then(|t| t.get("format")) {
        if let Some(rf) = response_format(format)? {
            chat.insert("response_format".into(), rf);
        }
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

/// Appends one Responses input item to the chat messages. Consecutive `function_call` items
/// (parallel calls) join one assistant message, as chat completions expects them.
fn push_item(messages: &mut Vec<Value>, item: &Value, at: &str) -> Result<(), TranslateError> {
    let obj = item
        .as_object()
        .ok_or_else(|| TranslateError::invalid(at, "must be an object"))?;
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let role = obj
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| TranslateError::invalid(format!("{at}.role"), "is required"))?;
            let role = match role {
                "user" | "assistant" | "system" => role,
                // Chat providers other than OpenAI do not all know `developer`.
                "developer" => "system",
                _ => {
                    return Err(TranslateError::invalid(
                        format!("{at}.role"),
                        "must be `user`, `assistant`, `system` or `developer`",
                    ))
                }
            };
            let content = chat_content(obj.get("content"), role, &format!("{at}.content"))?;
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let field = |name: &str| {
                obj.get(name).and_then(Value::as_str).ok_or_else(|| {
                    TranslateError::invalid(format!("{at}.{name}"), "must be a string")
                })
            };
            let call = json!({
                "id": field("call_id")?,
                "type": "function",
                "function": {"name": field("name")?, "arguments": field("arguments")?},
            });
            // Joins the assistant message just before it when that one is still open to
            // calls (text, then calls, or calls in parallel).
            if let Some(last) = messages.last_mut().and_then(Value::as_object_mut) {
                if last.get("role").and_then(Value::as_str) == Some("assistant") {
                    let calls = last
                        .entry("tool_calls")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Some(calls) = calls.as_array_mut() {
                        calls.push(call);
                        return Ok(());
                    }
                }
            }
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
        }
        "function_call_output" => {
            let call_id = obj.get("call_id").and_then(Value::as_str).ok_or_else(|| {
                TranslateError::invalid(format!("{at}.call_id"), "must be a string")
            })?;
            let output = match obj.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_of(parts, &format!("{at}.output"))?,
                _ => {
                    return Err(TranslateError::invalid(
                        format!("{at}.output"),
                        "must be a string or a list of text parts",
                    ))
                }
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // A model's reasoning from an earlier turn: chat targets take no reasoning input, and
        // replaying it as text would change the conversation.
        "reasoning" => {}
        "item_reference" => {
            return Err(TranslateError::unsupported(
                at,
                "item references need the stored response; send the item itself",
            ))
        }
        other => {
            return Err(TranslateError::unsupported(
                format!("{at}.type"),
                format!("`{other}` items need a target that speaks the Responses API"),
            ))
        }
    }
    Ok(())
}

/// A message's content in chat form: a string as is; parts mapped (`input_text` /
/// `output_text` → `text`, `input_image` → `image_url`). An assistant's content is its text
/// (chat completions takes only text from the assistant).
fn chat_content(content: Option<&Value>, role: &str, at: &str) -> Result<Value, TranslateError> {
    let parts = match content {
        Some(Value::String(s)) => return Ok(Value::from(s.as_str())),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(TranslateError::invalid(
                at,
                "must be a string or a list of content parts",
            ))
        }
    };
    if role != "user" {
        return Ok(Value::String(text_of(parts, at)?));
    }
    // One text part is a plain string, as the same input sent as a string becomes (a stored
    // conversation replays its string inputs as parts).
    if let [part] = parts.as_slice() {
        let kind = part.get("type").and_then(Value::as_str);
        if matches!(kind, Some("input_text" | "text")) {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                return Ok(Value::from(text));
            }
        }
    }
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let here = format!("{at}[{i}]");
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "input_text" | "output_text" | "text" => {
                let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                    TranslateError::invalid(format!("{here}.text"), "must be a string")
                })?;
                out.push(json!({"type": "text", "text": text}));
            }
            "input_image" => {
                let Some(url) = part.get("image_url").and_then(Value::as_str) else {
                    return Err(TranslateError::unsupported(
                        format!("{here}.image_url"),
                        "images are passed by `image_url` (a URL or a data: URL); `file_id` needs a target that speaks the Responses API",
                    ));
                };
                let mut image = json!({"url": url});
                if let (Some(detail), Some(image)) = (part.get("detail"), image.as_object_mut()) {
                    image.insert("detail".into(), detail.clone());
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            other => {
                return Err(TranslateError::unsupported(
                    format!("{here}.type"),
                    format!("`{other}` parts need a target that speaks the Responses API"),
                ))
            }
        }
    }
    Ok(Value::Array(out))
}

/// The text of a list of text parts, joined.
fn text_of(parts: &[Value], at: &str) -> Result<String, TranslateError> {
    let mut text = String::new();
    for (i, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, part.get("text").and_then(Value::as_str)) {
            ("input_text" | "output_text" | "text", Some(t)) => text.push_str(t),
            // A refusal is what the assistant said.
            ("refusal", _) => {
                if let Some(t) = part.get("refusal").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
            _ => {
                return Err(TranslateError::invalid(
                    format!("{at}[{i}]"),
                    "must be a text part here",
                ))
            }
        }
    }
    Ok(text)
}

/// A Responses function tool as a chat tool. Built-in tools (web search, file search,
/// computer use…) run at OpenAI: a chat target cannot run them.
fn chat_tool(tool: &Value, i: usize) -> Result<Value, TranslateError> {
    let at = format!("tools[{i}]");
    let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(TranslateError::unsupported(
            format!("{at}.type"),
            format!("`{kind}` tools need a target that speaks the Responses API; function tools work everywhere"),
        ));
    }
    let name = tool
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| TranslateError::invalid(format!("{at}.name"), "must be a string"))?;
    let mut function = Map::new();
    function.insert("name".into(), Value::from(name));
    for field in ["description", "parameters", "strict"] {
        if let Some(v) = tool.get(field).filter(|v| !v.is_null()) {
            function.insert(field.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, TranslateError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| TranslateError::invalid("tool_choice.name", "must be a string"))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(TranslateError::unsupported(
            "tool_choice",
            "only `auto`, `none`, `required` and a function tool can be chosen on this route",
        )),
    }
}

/// `text.format` as a chat `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, TranslateError> {
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let name = format
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| TranslateError::invalid("text.format.name", "must be a string"))?;
            let schema = format
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    TranslateError::invalid("text.format.schema", "must be an object")
                })?;
            let mut spec = Map::new();
            spec.insert("name".into(), Value::from(name));
            spec.insert("schema".into(), schema.clone());
            for field in ["strict", "description"] {
                if let Some(v) = format.get(field).filter(|v| !v.is_null()) {
                    spec.insert(field.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": spec})))
        }
        Some(other) => Err(TranslateError::invalid(
            "text.format.type",
            format!("`{other}` is not `text`, `json_object` or `json_schema`"),
        )),
    }
}

/// What a `response` object says besides its output: its id, the time it was created, and the
/// request parameters it echoes (as the Responses API does).
#[derive(Debug, Clone)]
pub struct Meta {
    /// `resp_…`; item ids are made from it.
    pub id: String,
    pub created_at: u64,
    /// The model the client asked for.
    pub model: String,
    /// The echoed request fields ([`Echo`]) as JSON object members (`"a":1,"b":2`), written
    /// once: a stream writes its `response` three times.
    echo: std::sync::Arc<str>,
}

/// The request fields a `response` echoes: the client's values, or the API's defaults when it
/// left them out. A struct, not a map: a `response` is written several times a stream.
#[derive(Debug, Clone, Serialize)]
struct Echo {
    instructions: Value,
    max_output_tokens: Value,
    metadata: Value,
    parallel_tool_calls: Value,
    previous_response_id: Value,
    reasoning: Value,
    temperature: Value,
    top_p: Value,
    user: Value,
    truncation: Value,
    tools: Value,
    tool_choice: Value,
    text: Value,
    store: bool,
}

/// A `response` object as it is written: serialized from the translation's state, not
/// built as a JSON tree first.
#[derive(Serialize)]
struct ResponseOut<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'a str,
    model: &'a str,
    output: &'a [Value],
    usage: &'a Value,
    error: &'a Option<Value>,
    incomplete_details: Option<Incomplete>,
}

#[derive(Serialize)]
struct Incomplete {
    reason: &'static str,
}

/// `response.output_item.added` and `.done`.
#[derive(Serialize)]
struct ItemEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    output_index: usize,
    item: &'a Value,
}

/// `response.content_part.added` and `.done`.
#[derive(Serialize)]
struct PartEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    content_index: u8,
    part: &'a Value,
}

/// `response.output_text.done`.
#[derive(Serialize)]
struct TextDone<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    content_index: u8,
    text: &'a str,
    logprobs: [u8; 0],
}

/// `response.function_call_arguments.done`.
#[derive(Serialize)]
struct ArgumentsDone<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    name: &'a str,
    arguments: &'a str,
}

/// `response.output_text.delta`: one a provider chunk, written from the chunk's own text.
#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    content_index: u8,
    delta: &'a str,
    logprobs: [u8; 0],
}

/// `response.function_call_arguments.delta`.
#[derive(Serialize)]
struct ArgumentsDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    delta: &'a str,
}

impl Meta {
    pub fn new(id: String, created_at: u64, request: &Value) -> Meta {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let field = |name: &str, default: Value| {
            request
                .get(name)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        // Present (even null) is the client's: only an absent field takes the default.
        let given =
            |name: &str, default: fn() -> Value| request.get(name).cloned().unwrap_or_else(default);
        let echo = Echo {
            instructions: field("instructions", Value::Null),
            max_output_tokens: field("max_output_tokens", Value::Null),
            metadata: field("metadata", Value::Null),
            parallel_tool_calls: field("parallel_tool_calls", Value::Bool(true)),
            previous_response_id: field("previous_response_id", Value::Null),
            reasoning: field("reasoning", Value::Null),
            temperature: field("temperature", Value::Null),
            top_p: field("top_p", Value::Null),
            user: field("user", Value::Null),
            truncation: field("truncation", Value::from("disabled")),
            tools: given("tools", || json!([])),
            tool_choice: given("tool_choice", || json!("auto")),
            text: given("text", || json!({"format": {"type": "text"}})),
            // Stored unless the client said not to (`GET /v1/responses/{id}` finds it).
            store: request.get("store").and_then(Value::as_bool) != Some(false),
        };
        let json = super::to_json(&echo, 512);
        // `{…}` without its braces (a struct with fields: never empty).
        let members = json
            .get(1..json.len().saturating_sub(1))
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        Meta {
            id,
            created_at,
            model,
            echo: members.into(),
        }
    }

    /// A `response` object with this status, output and usage, as JSON: its own fields, then
    /// the echoed ones (written once, by [`Meta::new`]).
    fn response_json(&self, status: &str, output: &[Value], usage: &Value, end: &End) -> Vec<u8> {
        let own = ResponseOut {
            id: &self.id,
            object: "response",
            created_at: self.created_at,
            status,
            model: &self.model,
            output,
            usage,
            error: &end.error,
            incomplete_details: end.incomplete.map(|reason| Incomplete { reason }),
        };
        let mut json = super::to_json(&own, 1024usize.saturating_add(self.echo.len()));
        if json.pop() == Some(b'}') {
            json.push(b',');
            json.extend_from_slice(self.echo.as_bytes());
            json.push(b'}');
        }
        json
    }

    /// A `response` object with this status, output and usage.
    fn response(&self, status: &str, output: Vec<Value>, usage: Value, end: &End) -> Value {
        serde_json::from_slice(&self.response_json(status, &output, &usage, end))
            .unwrap_or(Value::Null)
    }

    fn item_id(&self, prefix: &str, n: usize) -> String {
        let base = self.id.strip_prefix("resp_").unwrap_or(&self.id);
        format!("{prefix}_{base}_{n}")
    }
}

/// How an answer ended, as a `response` says it.
#[derive(Debug, Default, Clone)]
struct End {
    /// `incomplete_details.reason`.
    incomplete: Option<&'static str>,
    error: Option<Value>,
}

impl End {
    fn of(finish_reason: Option<&str>) -> End {
        End {
            incomplete: match finish_reason {
                Some("length") => Some("max_output_tokens"),
                Some("content_filter") => Some("content_filter"),
                _ => None,
            },
            error: None,
        }
    }

    fn status(&self) -> &'static str {
        match (&self.error, self.incomplete) {
            (Some(_), _) => "failed",
            (None, Some(_)) => "incomplete",
            (None, None) => "completed",
        }
    }
}

/// A chat `usage` object in Responses terms (zeros when absent).
pub fn usage(chat_usage: Option<&Value>) -> Value {
    let u = ChatUsage::of(chat_usage);
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": u.cache_written},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.total,
    })
}

/// A chat completion (non-streaming) as a `response` object: the first choice's text as a
/// `message` item, its tool calls as `function_call` items.
pub fn from_chat(chat: &Value, meta: &Meta) -> Value {
    let (output, usage, end) = answer_of(chat, meta);
    meta.response(end.status(), output, usage, &end)
}

/// [`from_chat`], written as JSON (without building the `response` as a tree first).
pub fn from_chat_json(chat: &Value, meta: &Meta) -> Vec<u8> {
    let (output, usage, end) = answer_of(chat, meta);
    meta.response_json(end.status(), &output, &usage, &end)
}

/// A chat completion's output items, usage and end, in Responses terms.
fn answer_of(chat: &Value, meta: &Meta) -> (Vec<Value>, Value, End) {
    let choice = super::first_choice(chat);
    let message = choice.and_then(|c| c.get("message"));
    let mut output = Vec::new();
    let text = message
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let refusal = message
        .and_then(|m| m.get("refusal"))
        .and_then(Value::as_str);
    if !text.is_empty() || refusal.is_some() {
        let part = match refusal {
            Some(r) if text.is_empty() => json!({"type": "refusal", "refusal": r}),
            _ => output_text(text),
        };
        output.push(message_item(
            meta.item_id("msg", 0),
            "completed",
            vec![part],
        ));
    }
    let calls = message
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for call in calls {
        let n = output.len();
        let s = |p: &str| call.pointer(p).and_then(Value::as_str).unwrap_or("");
        output.push(function_item(
            meta.item_id("fc", n),
            s("/id"),
            s("/function/name"),
            s("/function/arguments"),
            "completed",
        ));
    }
    let end = End::of(
        choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str),
    );
    (output, usage(chat.get("usage")), end)
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

fn message_item(id: String, status: &str, content: Vec<Value>) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn function_item(id: String, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status,
    })
}

/// Most output items (a message, tool calls) one streamed answer may open: each is kept until
/// the end, so a provider sending ever new tool call indexes must not grow them without bound.
const MAX_ITEMS: usize = 128;

/// One output item being streamed.
#[derive(Debug)]
enum Open {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Turns chat completion chunks into Responses stream events. Items stay open until the end
/// (each delta names its `output_index`, so a client keeps them apart); they are closed in
/// order before the last event.
#[derive(Debug)]
pub struct StreamTranslator {
    meta: Meta,
    sequence: u64,
    started: bool,
    items: Vec<Open>,
    /// The open text item's index in `items`, if any.
    message: Option<usize>,
    /// Chat tool call `index` → index in `items`.
    calls: Vec<(u64, usize)>,
    /// Which call each tool-call delta belongs to.
    call_keys: super::CallKeys,
    finish_reason: Option<String>,
    usage: Option<Value>,
    finished: bool,
    /// The finished `response` (completed or incomplete), for storing: kept as written, and
    /// parsed only when it is stored.
    completed: Option<Vec<u8>>,
}

impl StreamTranslator {
    pub fn new(meta: Meta) -> StreamTranslator {
        StreamTranslator {
            meta,
            sequence: 0,
            started: false,
            items: Vec::new(),
            message: None,
            calls: Vec::new(),
            call_keys: super::CallKeys::default(),
            finish_reason: None,
            usage: None,
            finished: false,
            completed: None,
        }
    }

    /// The finished `response` of a stream that completed (or was cut by its token limit),
    /// once.
    pub fn take_completed(&mut self) -> Option<Value> {
        let json = self.completed.take()?;
        serde_json::from_slice(&json).ok()
    }

    /// The next event's sequence number.
    fn next(&mut self) -> u64 {
        let n = self.sequence;
        self.sequence = self.sequence.saturating_add(1);
        n
    }

    /// An event carrying `response` (already JSON): written around it, not parsed again.
    fn response_event(&mut self, out: &mut Vec<Event>, kind: &'static str, response: &[u8]) {
        let sequence_number = self.next();
        let mut data = Vec::with_capacity(response.len().saturating_add(96));
        // `kind` is one of this file's fixed event names: nothing in it to escape.
        data.extend_from_slice(b"{\"type\":\"");
        data.extend_from_slice(kind.as_bytes());
        data.extend_from_slice(b"\",\"sequence_number\":");
        // Written into the buffer: no string allocated for a number.
        let _ = std::io::Write::write_fmt(&mut data, format_args!("{sequence_number}"));
        data.extend_from_slice(b",\"response\":");
        data.extend_from_slice(response);
        data.push(b'}');
        out.push(Event::json(kind, data));
    }

    /// A `response` object of this stream, as JSON.
    fn response_now(&self, status: &str, output: &[Value], end: &End) -> Vec<u8> {
        let usage = usage(self.usage.as_ref());
        self.meta.response_json(status, output, &usage, end)
    }

    /// `response.output_item.added` or `.done`.
    fn item_event(&mut self, out: &mut Vec<Event>, kind: &'static str, index: usize, item: &Value) {
        let sequence_number = self.next();
        out.push(Event::new(
            kind,
            &ItemEvent {
                kind,
                sequence_number,
                output_index: index,
                item,
            },
        ));
    }

    /// `response.content_part.added` or `.done`.
    fn part_event(
        &mut self,
        out: &mut Vec<Event>,
        kind: &'static str,
        (item_id, index): (&str, usize),
        part: &Value,
    ) {
        let sequence_number = self.next();
        out.push(Event::new(
            kind,
            &PartEvent {
                kind,
                sequence_number,
                item_id,
                output_index: index,
                content_index: 0,
                part,
            },
        ));
    }

    /// `response.created` and `response.in_progress`, once, before anything else.
    pub fn start(&mut self, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        // Usage is not known yet: null (as OpenAI sends it), not zeros.
        let r = self
            .meta
            .response_json("in_progress", &[], &Value::Null, &End::default());
        self.response_event(out, "response.created", &r);
        self.response_event(out, "response.in_progress", &r);
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
        let Some(delta) = choice.get("delta") else {
            return;
        };
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            self.text(text, out);
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for call in calls {
                self.call(call, out);
            }
        }
    }

    fn text(&mut self, text: &str, out: &mut Vec<Event>) {
        let index = match self.message {
            Some(i) => i,
            None => {
                let i = self.items.len();
                let id = self.meta.item_id("msg", i);
                self.items.push(Open::Message {
                    id: id.clone(),
                    text: String::new(),
                });
                self.message = Some(i);
                let item = message_item(id.clone(), "in_progress", Vec::new());
                self.item_event(out, "response.output_item.added", i, &item);
                self.part_event(
                    out,
                    "response.content_part.added",
                    (&id, i),
                    &output_text(""),
                );
                i
            }
        };
        if !matches!(self.items.get(index), Some(Open::Message { .. })) {
            return;
        }
        let sequence_number = self.next();
        let Some(Open::Message { id, text: all }) = self.items.get_mut(index) else {
            return;
        };
        all.push_str(text);
        out.push(Event::new(
            "response.output_text.delta",
            &TextDelta {
                kind: "response.output_text.delta",
                sequence_number,
                item_id: id,
                output_index: index,
                content_index: 0,
                delta: text,
                logprobs: [],
            },
        ));
    }

    fn call(&mut self, call: &Value, out: &mut Vec<Event>) {
        let key = self.call_keys.key(call);
        let index = match self.calls.iter().find(|(k, _)| *k == key) {
            Some((_, i)) => *i,
            None if self.items.len() >= MAX_ITEMS => {
                self.fail("the provider's answer opened too many tool calls", out);
                return;
            }
            None => {
                let i = self.items.len();
                let id = self.meta.item_id("fc", i);
                let s = |p: &str| {
                    call.pointer(p)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                let (call_id, name) = (s("/id"), s("/function/name"));
                let item = function_item(id.clone(), &call_id, &name, "", "in_progress");
                self.items.push(Open::Call {
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                });
                self.calls.push((key, i));
                self.item_event(out, "response.output_item.added", i, &item);
                i
            }
        };
        let delta = call
            .get("function")
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty());
        let Some(delta) = delta else {
            return;
        };
        if !matches!(self.items.get(index), Some(Open::Call { .. })) {
            return;
        }
        let sequence_number = self.next();
        let Some(Open::Call { id, arguments, .. }) = self.items.get_mut(index) else {
            return;
        };
        arguments.push_str(delta);
        out.push(Event::new(
            "response.function_call_arguments.delta",
            &ArgumentsDelta {
                kind: "response.function_call_arguments.delta",
                sequence_number,
                item_id: id,
                output_index: index,
                delta,
            },
        ));
    }

    /// Closes every item and ends the stream: `response.completed`, or `response.incomplete`
    /// when the answer was cut (`max_output_tokens`, a content filter). Call on `[DONE]`.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.start(out);
        let end = End::of(self.finish_reason.as_deref());
        let output = self.close_items(out, "completed");
        let r = self.response_now(end.status(), &output, &end);
        let kind = if end.incomplete.is_some() {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.finished = true;
        self.response_event(out, kind, &r);
        self.completed = Some(r);
    }

    /// Ends the stream with `response.failed`: the target failed after the first event.
    pub fn fail(&mut self, message: &str, out: &mut Vec<Event>) {
        if self.finished {
            return;
        }
        self.start(out);
        let output = self.close_items(out, "incomplete");
        let end = End {
            incomplete: None,
            error: Some(json!({"code": "server_error", "message": message})),
        };
        let r = self.response_now("failed", &output, &end);
        self.finished = true;
        self.response_event(out, "response.failed", &r);
    }

    /// Whether the stream has ended (completed, incomplete or failed).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The `.done` events of every open item, in order, and the finished items.
    fn close_items(&mut self, out: &mut Vec<Event>, status: &str) -> Vec<Value> {
        let items = std::mem::take(&mut self.items);
        let mut output = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let done = match item {
                Open::Message { id, text } => {
                    let sequence_number = self.next();
                    out.push(Event::new(
                        "response.output_text.done",
                        &TextDone {
                            kind: "response.output_text.done",
                            sequence_number,
                            item_id: &id,
                            output_index: i,
                            content_index: 0,
                            text: &text,
                            logprobs: [],
                        },
                    ));
                    let part = output_text(&text);
                    self.part_event(out, "response.content_part.done", (&id, i), &part);
                    message_item(id, status, vec![part])
                }
                Open::Call {
                    id,
                    call_id,
                    name,
                    arguments,
                } => {
                    let sequence_number = self.next();
                    out.push(Event::new(
                        "response.function_call_arguments.done",
                        &ArgumentsDone {
                            kind: "response.function_call_arguments.done",
                            sequence_number,
                            item_id: &id,
                            output_index: i,
                            name: &name,
                            arguments: &arguments,
                        },
                    ));
                    function_item(id, &call_id, &name, &arguments, status)
                }
            };
            self.item_event(out, "response.output_item.done", i, &done);
            output.push(done);
        }
        output
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// Requests as the official SDK sends them, and the chat requests they become.
    #[test]
    fn requests_become_chat_requests() {
        let cases = [
            (
                "a string input, instructions and sampling",
                json!({"model": "m", "input": "Hi", "instructions": "Be brief.",
                       "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1"}),
                json!({"model": "m", "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"}],
                       "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1"}),
            ),
            (
                "a tool round trip: parallel calls join one assistant message",
                json!({"model": "m", "input": [
                    {"role": "developer", "content": "Use tools."},
                    {"type": "message", "role": "user", "content": [
                        {"type": "input_text", "text": "Weather in "},
                        {"type": "input_text", "text": "Paris?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AA==", "detail": "low"}]},
                    {"type": "reasoning", "id": "rs_1", "summary": []},
                    {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
                    {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "18C"},
                    {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "18C at noon."}]}]}),
                json!({"model": "m", "messages": [
                    {"role": "system", "content": "Use tools."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather in "},
                        {"type": "text", "text": "Paris?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"}}]},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                    {"role": "tool", "tool_call_id": "c2", "content": "noon"},
                    {"role": "assistant", "content": "18C at noon."}]}),
            ),
            (
                "tools, a forced tool, structured output, streaming",
                json!({"model": "m", "input": "x", "stream": true, "parallel_tool_calls": false,
                       "tools": [{"type": "function", "name": "f", "description": "d",
                                  "parameters": {"type": "object", "properties": {}}, "strict": true}],
                       "tool_choice": {"type": "function", "name": "f"},
                       "text": {"format": {"type": "json_schema", "name": "out", "strict": true,
                                           "schema": {"type": "object"}}}}),
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "stream": true, "stream_options": {"include_usage": true},
                       "parallel_tool_calls": false,
                       "tools": [{"type": "function", "function": {"name": "f", "description": "d",
                                  "parameters": {"type": "object", "properties": {}}, "strict": true}}],
                       "tool_choice": {"type": "function", "function": {"name": "f"}},
                       "response_format": {"type": "json_schema", "json_schema":
                                           {"name": "out", "strict": true, "schema": {"type": "object"}}}}),
            ),
            (
                "plain text format and json_object",
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}, "tool_choice": "required"}),
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_object"}, "tool_choice": "required"}),
            ),
        ];
        for (name, request, chat) in cases {
            let got = to_chat(&request, &[]).unwrap();
            assert_eq!(got.body, chat, "{name}");
            assert!(got.dropped.is_empty(), "{name}: {:?}", got.dropped);
        }
    }

    #[test]
    fn fields_chat_cannot_carry_are_dropped_and_named() {
        let request = json!({"model": "m", "input": "x", "reasoning": {"effort": "low"},
                             "metadata": {"a": "b"}, "store": false});
        let got = to_chat(&request, &[]).unwrap();
        assert_eq!(got.dropped, vec!["reasoning", "metadata"]);
        let body = got.body.as_object().unwrap();
        for field in ["reasoning", "metadata", "store"] {
            assert!(!body.contains_key(field), "{field}");
        }
    }

    /// A continued conversation: the instructions of this turn, then the earlier turn's
    /// items, then this turn's input.
    #[test]
    fn history_comes_after_the_instructions_and_before_the_input() {
        let history = [
            json!({"role": "user", "content": "My name is Ada."}),
            json!({"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                   "content": [{"type": "output_text", "text": "Hello Ada.", "annotations": []}]}),
        ];
        let request = json!({"model": "m", "instructions": "Be kind.", "input": "Who am I?"});
        let got = to_chat(&request, &history).unwrap();
        assert_eq!(
            got.body["messages"],
            json!([{"role": "system", "content": "Be kind."},
                   {"role": "user", "content": "My name is Ada."},
                   {"role": "assistant", "content": "Hello Ada."},
                   {"role": "user", "content": "Who am I?"}])
        );
    }

    #[test]
    fn requests_a_chat_target_cannot_serve_are_refused_with_the_field() {
        let cases = [
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
                true,
            ),
            (json!({"model": "m"}), "input", false),
            (json!({"model": "m", "input": []}), "input", false),
            (json!({"input": "x"}), "model", false),
            (
                json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}),
                "input[0].role",
                false,
            ),
            (
                json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
                "input[0]",
                true,
            ),
            (
                json!({"model": "m", "input": [{"type": "computer_call_output"}]}),
                "input[0].type",
                true,
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[0].call_id",
                false,
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
                "input[0].content[0].image_url",
                true,
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": 7}]}),
                "input[0].content",
                false,
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format.type",
                false,
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
                "text.format.schema",
                false,
            ),
            (
                json!({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}),
                "tool_choice",
                true,
            ),
            (
                json!({"model": "m", "input": "x", "instructions": 3}),
                "instructions",
                false,
            ),
            (json!([1, 2]), "body", false),
        ];
        for (request, field, unsupported) in cases {
            let err = to_chat(&request, &[]).unwrap_err();
            assert_eq!(err.field(), field, "{request}");
            assert_eq!(
                matches!(err, TranslateError::Unsupported { .. }),
                unsupported,
                "{request}: {err}"
            );
        }
    }

    fn meta() -> Meta {
        Meta::new(
            "resp_abc".into(),
            1_700_000_000,
            &json!({"model": "m", "input": "x", "temperature": 0.5}),
        )
    }

    #[test]
    fn a_chat_answer_becomes_a_response() {
        let chat = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
                "content": "Checking.", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 4},
                      "completion_tokens_details": {"reasoning_tokens": 2}}});
        let r = from_chat(&chat, &meta());
        assert_eq!(r["id"], "resp_abc");
        assert_eq!(r["object"], "response");
        assert_eq!(r["status"], "completed");
        assert_eq!(r["model"], "m", "the model the client asked for");
        assert_eq!(r["temperature"], 0.5);
        assert_eq!(r["tool_choice"], "auto");
        assert_eq!(r["incomplete_details"], Value::Null);
        assert_eq!(
            r["output"],
            json!([{"type": "message", "id": "msg_abc_0", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
                   {"type": "function_call", "id": "fc_abc_1", "call_id": "c1", "name": "weather",
                    "arguments": "{\"city\":\"Paris\"}", "status": "completed"}])
        );
        assert_eq!(
            r["usage"],
            json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                   "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2},
                   "total_tokens": 15})
        );
    }

    #[test]
    fn an_answer_cut_by_its_token_limit_is_incomplete_and_usage_is_never_missing() {
        let chat = json!({"choices": [{"index": 0, "finish_reason": "length",
            "message": {"role": "assistant", "content": "Once upon"}}]});
        let r = from_chat(&chat, &meta());
        assert_eq!(r["status"], "incomplete");
        assert_eq!(
            r["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(r["usage"]["output_tokens_details"]["reasoning_tokens"], 0);
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 0);
    }

    fn chunk(delta: Value, finish: Option<&str>) -> Value {
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    #[test]
    fn tool_calls_streamed_without_an_index_stay_apart() {
        // Some OpenAI-compatible providers leave `index` out of tool-call deltas.
        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        for c in [
            chunk(
                json!({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{\"x\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"function": {"arguments": "1}"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
        ] {
            t.chunk(&c, &mut out);
        }
        t.finish(&mut out);
        let out = crate::translate::pairs(&out);
        let done: Vec<&Value> = out
            .iter()
            .filter(|(k, _)| *k == "response.output_item.done")
            .map(|(_, v)| &v["item"])
            .collect();
        assert_eq!(done.len(), 2, "{out:?}");
        assert_eq!(
            (&done[0]["call_id"], &done[0]["arguments"]),
            (&json!("c1"), &json!("{\"x\":1}"))
        );
        assert_eq!(
            (&done[1]["call_id"], &done[1]["arguments"]),
            (&json!("c2"), &json!("{}"))
        );
    }

    #[test]
    fn a_chat_stream_becomes_the_responses_event_sequence() {
        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        let chunks = [
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Hel"}), None),
            chunk(json!({"content": "lo"}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                         "function": {"name": "weather", "arguments": ""}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\""}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": ":\"Paris\"}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
            json!({"object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}),
        ];
        let mut after_each = Vec::new();
        for c in &chunks {
            t.chunk(c, &mut out);
            after_each.push(out.len());
        }
        // Each argument piece is out as soon as its chunk is (nothing held to the end).
        assert_eq!(
            out[after_each[4] - 1].kind,
            "response.function_call_arguments.delta"
        );
        assert_eq!(out[after_each[4] - 1].value()["delta"], "{\"city\"");
        t.finish(&mut out);
        t.finish(&mut out);
        t.fail("late", &mut out);
        let out = crate::translate::pairs(&out);
        let kinds: Vec<&str> = out.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (kind, data)) in out.iter().enumerate() {
            assert_eq!(data["sequence_number"], i as u64, "{kind}");
            assert_eq!(data["type"], *kind);
        }
        assert_eq!(out[0].1["response"]["status"], "in_progress");
        assert_eq!(out[9].1["text"], "Hello");
        assert_eq!(out[12].1["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(out[12].1["output_index"], 1);
        let done = &out[14].1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][1]["call_id"], "c1");
        assert_eq!(done["usage"]["input_tokens"], 7);
        assert_eq!(done["usage"]["output_tokens"], 3);
        assert!(t.finished());
    }

    #[test]
    fn a_stream_that_fails_ends_with_response_failed_and_a_cut_one_is_incomplete() {
        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        t.chunk(&chunk(json!({"content": "Hi"}), None), &mut out);
        t.fail("the provider dropped the connection", &mut out);
        let out = crate::translate::pairs(&out);
        let (kind, data) = out.last().unwrap();
        assert_eq!(*kind, "response.failed");
        assert_eq!(data["response"]["status"], "failed");
        assert_eq!(
            data["response"]["error"]["message"],
            "the provider dropped the connection"
        );
        assert_eq!(data["response"]["output"][0]["status"], "incomplete");

        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        t.chunk(&chunk(json!({"content": "Once"}), Some("length")), &mut out);
        t.finish(&mut out);
        let out = crate::translate::pairs(&out);
        let (kind, data) = out.last().unwrap();
        assert_eq!(*kind, "response.incomplete");
        assert_eq!(
            data["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }

    /// A provider that opens ever new tool calls ends the stream with `response.failed` at
    /// the item limit instead of growing it.
    #[test]
    fn a_stream_opening_too_many_items_fails_once() {
        let mut t = StreamTranslator::new(meta());
        let mut out = Vec::new();
        for i in 0..1000u64 {
            let call = json!({"tool_calls": [{"index": i, "id": format!("c{i}"),
                                               "function": {"name": "f", "arguments": "{}"}}]});
            t.chunk(&chunk(call, None), &mut out);
        }
        assert!(t.finished());
        let out = crate::translate::pairs(&out);
        let failed: Vec<_> = out
            .iter()
            .filter(|(k, _)| *k == "response.failed")
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(
            failed[0].1["response"]["output"].as_array().unwrap().len(),
            MAX_ITEMS
        );
        assert_eq!(out.last().unwrap().0, "response.failed");
    }
}
