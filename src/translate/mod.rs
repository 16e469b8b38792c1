//! Translation between the APIs clients speak and the one most targets speak (DESIGN.md step
//! 6). Chat Completions is the hub: every OpenAI-compatible provider and the sidecar speak it,
//! so a request in another API family is translated to a chat request on its way in, and the
//! chat answer (whole, or chunk by chunk) back into the client's family on its way out. A
//! target that speaks the client's API natively gets the request as it came (no translation).
//!
//! | file | what it does |
//! |---|---|
//! | `responses.rs` | OpenAI's Responses API: request → chat, chat answer → `response`, chat stream → Responses events |
//! | `messages.rs` | Anthropic's Messages API: request → chat, chat answer → `message`, chat stream → Messages events, errors in Anthropic's shape |
//! | `answer.rs` | the pipeline's one handle on a translated answer or stream, whichever the API |
//! | `messages_provider.rs` | the other way, for a provider that speaks the Messages API: chat request → Messages, `message` → chat answer, Messages events → chat chunks |
//!
//! What both share lives here: the usage a chat answer reports ([`ChatUsage`]), a stream's
//! events and their SSE form ([`Event`], [`write_sse`]), and the one type the pipeline holds
//! for a translated answer and stream (`answer.rs`: [`answer::Answer`], [`answer::Stream`]).
//!
//! Pure functions over JSON values, no I/O: the pipeline decides when to translate, these only
//! say how. Client input is never trusted: every shape is checked and a wrong one is a
//! [`TranslateError`] (a 400 naming the field), never a panic.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod answer;
pub mod messages;
pub mod messages_provider;
pub mod responses;

use serde_json::Value;

/// Which tool call a streamed chat `tool_calls` delta belongs to. OpenAI numbers them with
/// `index`; some OpenAI-compatible providers leave it out and send a call's `id` only on its
/// first delta. Without an `index`, a delta with a new `id` starts the next call and one
/// without an `id` (or with the same one) continues the last, so two calls never merge.
#[derive(Debug, Default)]
pub struct CallKeys {
    /// The last call's key and `id` (empty when it had none).
    last: Option<(u64, String)>,
    /// The key after the highest seen.
    next: u64,
}

impl CallKeys {
    pub fn key(&mut self, call: &Value) -> u64 {
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|i| !i.is_empty());
        let key = match (call.get("index").and_then(Value::as_u64), &self.last) {
            (Some(index), _) => index,
            (None, Some((key, last))) if id.is_none_or(|i| i == last || last.is_empty()) => *key,
            (None, _) => self.next,
        };
        self.next = self.next.max(key.saturating_add(1));
        let same = self.last.as_ref().is_some_and(|(k, _)| *k == key);
        if !same {
            self.last = Some((key, id.unwrap_or_default().to_string()));
        } else if let (Some((_, last)), Some(i)) = (self.last.as_mut(), id) {
            if last.is_empty() {
                *last = i.to_string();
            }
        }
        key
    }
}

/// A request that cannot be translated, said in the client's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// A field has the wrong shape or a value the API does not define.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// A field the API defines that a translated request cannot carry (a built-in tool, a
    /// stored item reference): the target would need to speak the client's API natively.
    #[error("`{field}` is not supported on this route: {reason}")]
    Unsupported { field: String, reason: String },
}

impl TranslateError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
        TranslateError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> TranslateError {
        TranslateError::Unsupported {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field the error names (an OpenAI error's `param`).
    pub fn field(&self) -> &str {
        match self {
            TranslateError::Invalid { field, .. } | TranslateError::Unsupported { field, .. } => {
                field
            }
        }
    }
}

/// The usage a chat answer reports, with zeros for what it leaves out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChatUsage {
    pub input: u64,
    pub output: u64,
    pub total: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cached: u64,
    /// Input tokens written to it (providers that bill writes apart report them).
    pub cache_written: u64,
    pub reasoning: u64,
}

impl ChatUsage {
    pub fn of(usage: Option<&Value>) -> ChatUsage {
        // Plain lookups, not JSON pointers: a pointer is parsed again on every call.
        let u = usage.filter(|u| u.is_object());
        let n = |v: Option<&Value>, key: &str| {
            v.and_then(|v| v.get(key))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let (input, output) = (n(u, "prompt_tokens"), n(u, "completion_tokens"));
        let prompt_details = u.and_then(|u| u.get("prompt_tokens_details"));
        ChatUsage {
            input,
            output,
            total: u
                .and_then(|u| u.get("total_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or_else(|| input.saturating_add(output)),
            cached: n(prompt_details, "cached_tokens"),
            cache_written: n(prompt_details, "cache_write_tokens"),
            reasoning: n(
                u.and_then(|u| u.get("completion_tokens_details")),
                "reasoning_tokens",
            ),
        }
    }
}

/// An estimate of a chat request's prompt tokens, for the token counting endpoints: about four
/// characters a token for text (English prose runs 3.5–4.5 with the common BPE tokenizers), a
/// few tokens of framing per message, tool definitions by their JSON size, and an image at
/// OpenAI's low-detail cost.
pub fn estimate_prompt_tokens(chat: &Value) -> u64 {
    fn text(chars: usize) -> u64 {
        (chars as u64).div_ceil(4)
    }
    let mut tokens: u64 = 3;
    let messages = chat.get("messages").and_then(Value::as_array);
    for message in messages.map(Vec::as_slice).unwrap_or_default() {
        tokens = tokens.saturating_add(4);
        match message.get("content") {
            Some(Value::String(s)) => tokens = tokens.saturating_add(text(s.chars().count())),
            Some(Value::Array(parts)) => {
                for part in parts {
                    let cost = match part.get("text").and_then(Value::as_str) {
                        Some(t) => text(t.chars().count()),
                        None => 85,
                    };
                    tokens = tokens.saturating_add(cost);
                }
            }
            _ => {}
        }
        if let Some(calls) = message.get("tool_calls") {
            tokens = tokens.saturating_add(text(calls.to_string().len()));
        }
    }
    if let Some(tools) = chat.get("tools") {
        tokens = tokens.saturating_add(text(tools.to_string().len()));
    }
    tokens
}

/// One stream event: its type (the SSE `event:` line) and its data, already JSON. Events are
/// serialized as they are made, most straight from the translation's state (typed structs
/// that borrow it): building a JSON tree for each event and writing it out later cost as
/// much as the rest of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    data: Vec<u8>,
}

impl Event {
    /// An event whose data is `data` as JSON.
    pub fn new(kind: &'static str, data: &impl serde::Serialize) -> Event {
        Event {
            kind,
            data: to_json(data, 256),
        }
    }

    /// An event whose data is already JSON (`data` must be valid JSON: the caller wrote it).
    pub fn json(kind: &'static str, data: Vec<u8>) -> Event {
        Event { kind, data }
    }

    /// The event's data, parsed (for tests and the rare reader that needs a tree).
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.data).unwrap_or(Value::Null)
    }
}

/// A chat answer's (or chunk's) first choice. (Not `pointer("/choices/0")`: a JSON pointer is
/// parsed again on every call, and this runs once a chunk.)
pub fn first_choice(chat: &Value) -> Option<&Value> {
    chat.get("choices")?.get(0)
}

/// A provider's chat chunk with only what the stream translators read of it (the first
/// choice's finish and stop reasons and its delta's text, reasoning and tool calls; `usage`),
/// the rest skipped unread: ids, model names and fingerprints are parsed once a chunk and never
/// used. A chunk of another shape (or one carrying `error`) is parsed whole, so the
/// translators see the same answer to every question they ask of it.
pub fn chunk_of(data: &[u8]) -> serde_json::Result<Value> {
    use serde::Deserialize;
    use serde_json::value::RawValue;

    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(d).map(Some)
    }

    /// An object, read as `T`; anything else (an array especially, which serde's derived
    /// structs would take field by field) is an error, so the chunk is parsed whole.
    struct Obj<T>(T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Only<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Only<T> {
                type Value = T;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                    T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                }
            }
            d.deserialize_map(Only(std::marker::PhantomData)).map(Obj)
        }
    }

    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(default, borrow, deserialize_with = "present")]
        error: Option<&'a RawValue>,
        #[serde(default)]
        usage: Option<Value>,
        #[serde(default)]
        choices: Option<Vec<Obj<Choice>>>,
    }

    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        delta: Option<Obj<Delta>>,
        #[serde(default)]
        finish_reason: Option<Value>,
        #[serde(default)]
        stop_reason: Option<Value>,
    }

    #[derive(Deserialize)]
    struct Delta {
        #[serde(default)]
        content: Option<Value>,
        #[serde(default)]
        reasoning_content: Option<Value>,
        #[serde(default)]
        tool_calls: Option<Value>,
    }

    let chunk = match serde_json::from_slice::<Obj<Chunk>>(data) {
        Ok(Obj(chunk)) if chunk.error.is_none() => chunk,
        _ => return serde_json::from_slice(data),
    };
    let mut out = serde_json::Map::new();
    if let Some(usage) = chunk.usage {
        out.insert("usage".into(), usage);
    }
    if let Some(Obj(first)) = chunk.choices.and_then(|c| c.into_iter().next()) {
        let mut choice = serde_json::Map::new();
        let put = |map: &mut serde_json::Map<String, Value>, key: &str, v: Option<Value>| {
            if let Some(v) = v {
                map.insert(key.into(), v);
            }
        };
        put(&mut choice, "finish_reason", first.finish_reason);
        put(&mut choice, "stop_reason", first.stop_reason);
        if let Some(Obj(d)) = first.delta {
            let mut delta = serde_json::Map::new();
            put(&mut delta, "content", d.content);
            put(&mut delta, "reasoning_content", d.reasoning_content);
            put(&mut delta, "tool_calls", d.tool_calls);
            choice.insert("delta".into(), Value::Object(delta));
        }
        out.insert("choices".into(), Value::Array(vec![Value::Object(choice)]));
    }
    Ok(Value::Object(out))
}

/// A whole chat completion as the one chunk its stream would have carried: the first choice's
/// message as the delta (a refusal as its text when it has none, as a whole Messages answer
/// reads it), its finish and stop reasons, the usage. What a stream translator makes of a
/// provider that answered a stream request whole. `None`: not a chat completion.
pub fn whole_as_chunk(chat: &Value) -> Option<Value> {
    let answer = chat.as_object()?;
    let choices = answer.get("choices")?.as_array()?;
    let mut chunk = serde_json::Map::new();
    if let Some(usage) = answer.get("usage") {
        chunk.insert("usage".into(), usage.clone());
    }
    if let Some(choice) = choices.first() {
        let mut out = serde_json::Map::new();
        for key in ["finish_reason", "stop_reason"] {
            if let Some(v) = choice.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        if let Some(message) = choice.get("message") {
            let mut delta = serde_json::Map::new();
            for key in ["content", "reasoning_content", "tool_calls"] {
                if let Some(v) = message.get(key) {
                    delta.insert(key.into(), v.clone());
                }
            }
            let no_text = message
                .get("content")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty);
            if let Some(refusal) = message.get("refusal").filter(|_| no_text) {
                delta.insert("content".into(), refusal.clone());
            }
            out.insert("delta".into(), Value::Object(delta));
        }
        chunk.insert("choices".into(), Value::Array(vec![Value::Object(out)]));
    }
    Some(Value::Object(chunk))
}

/// `value` as JSON, into a buffer sized for it up front (`to_vec` starts small and grows by
/// copying, which showed up in profiles).
pub fn to_json(value: &impl serde::Serialize, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    // Serializing into a Vec fails only for a map with non-string keys (none here).
    let _ = serde_json::to_writer(&mut out, value);
    out
}

/// Events as (type, data) pairs, for tests to read.
#[cfg(test)]
pub(crate) fn pairs(events: &[Event]) -> Vec<(&'static str, Value)> {
    events.iter().map(|e| (e.kind, e.value())).collect()
}

/// Appends one event as SSE bytes: `event: <type>` and `data: <json>`.
pub fn write_sse(out: &mut Vec<u8>, event: &Event) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&event.data);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_call_deltas_find_their_call_with_or_without_an_index() {
        let keys = |deltas: &[Value]| {
            let mut k = CallKeys::default();
            deltas.iter().map(|c| k.key(c)).collect::<Vec<u64>>()
        };
        let with = [
            json!({"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}),
            json!({"index": 0, "function": {"arguments": "{"}}),
            json!({"index": 1, "id": "b", "function": {"name": "g"}}),
            json!({"index": 1, "function": {"arguments": "}"}}),
        ];
        assert_eq!(keys(&with), [0, 0, 1, 1]);
        // No index: a new id is the next call, no id (or the same id) the last one.
        let without = [
            json!({"id": "a", "function": {"name": "f", "arguments": ""}}),
            json!({"function": {"arguments": "{"}}),
            json!({"id": "a", "function": {"arguments": "}"}}),
            json!({"id": "b", "function": {"name": "g"}}),
            json!({"function": {"arguments": "{}"}}),
        ];
        assert_eq!(keys(&without), [0, 0, 0, 1, 1]);
        // A first delta with neither is call 0, and an id arriving later names it.
        let late = [
            json!({"function": {"arguments": "{"}}),
            json!({"id": "a", "function": {"arguments": "}"}}),
            json!({"id": "b", "function": {"arguments": "{}"}}),
        ];
        assert_eq!(keys(&late), [0, 0, 1]);
    }

    /// A chunk read lightly (`chunk_of`) translates exactly as the same chunk parsed whole.
    #[test]
    fn a_chunk_read_lightly_translates_as_one_parsed_whole() {
        let chunks = [
            r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null},"finish_reason":"stop","stop_reason":"END"}]}"#,
            r#"{"choices":[{"index":0,"delta":null}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            r#"{"choices":[1],"usage":null}"#,
            r#"{"choices":{"0":{}}}"#,
            r#"{"choices":[{"delta":"text","finish_reason":7}]}"#,
            r#"{"choices":[{"delta":["hi"]}]}"#,
            r#"{"choices":[[{"content":"x"}]]}"#,
            r#"[{"choices":[]}]"#,
        ];
        let run = |light: bool| {
            let mut r = responses::StreamTranslator::new(responses::Meta::new(
                "resp_1".into(),
                1,
                &json!({"model": "m", "input": "x"}),
            ));
            let mut m = messages::StreamTranslator::new(messages::Meta::new(
                "msg_1".into(),
                &json!({"model": "m"}),
            ));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for c in chunks {
                let v: Value = if light {
                    chunk_of(c.as_bytes()).unwrap()
                } else {
                    serde_json::from_str(c).unwrap()
                };
                r.chunk(&v, &mut a);
                m.chunk(&v, &mut b);
            }
            r.finish(&mut a);
            m.finish(&mut b);
            (a, b)
        };
        assert_eq!(run(true), run(false));
        // An `error` chunk is read whole (the translation fails the stream on it).
        let e = chunk_of(br#"{"error":null,"choices":[]}"#).unwrap();
        assert_eq!(e.get("error"), Some(&Value::Null));
        assert!(chunk_of(b"{nope").is_err());
    }

    #[test]
    fn events_are_written_as_named_sse_events() {
        let mut bytes = b"before\n\n".to_vec();
        write_sse(
            &mut bytes,
            &Event::new("response.output_text.delta", &json!({"delta": "a\nb"})),
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "before\n\nevent: response.output_text.delta\ndata: {\"delta\":\"a\\nb\"}\n\n"
        );
    }

    #[test]
    fn prompt_estimates_grow_with_text_messages_and_tools() {
        let one = json!({"messages": [{"role": "user", "content": "abcdefgh"}]});
        assert_eq!(estimate_prompt_tokens(&one), 3 + 4 + 2);
        let two = json!({"messages": [{"role": "system", "content": "abcd"},
                                      {"role": "user", "content": [{"type": "text", "text": "abcdefgh"},
                                                                   {"type": "image_url", "image_url": {"url": "x"}}]}]});
        assert_eq!(estimate_prompt_tokens(&two), 3 + 4 + 1 + 4 + 2 + 85);
        let tools = json!({"messages": [{"role": "user", "content": "abcdefgh"}],
                           "tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(estimate_prompt_tokens(&tools) > estimate_prompt_tokens(&one));
        assert_eq!(estimate_prompt_tokens(&json!({})), 3);
    }

    #[test]
    fn usage_reads_every_detail_and_defaults_to_zero() {
        let u = ChatUsage::of(Some(&json!({"prompt_tokens": 10, "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 1}})));
        assert_eq!(
            u,
            ChatUsage {
                input: 10,
                output: 4,
                total: 14,
                cached: 3,
                cache_written: 2,
                reasoning: 1
            }
        );
        assert_eq!(ChatUsage::of(None), ChatUsage::default());
        assert_eq!(ChatUsage::of(Some(&json!("x"))), ChatUsage::default());
    }
}
