//! The OpenAI API surface as the gateway sees it: which endpoints exist, and the few body fields
//! routing and policy need.
//!
//! Bodies are not parsed into a tree. One pass with serde validates the JSON and borrows the
//! fields we act on (`model`, `stream`, and the required input field); everything else is
//! skipped. The raw bytes are kept and forwarded, with only the `model` value spliced, so a
//! 1 MiB prompt costs one scan and no per-field allocation.

// Reachable from the network: no panics (issue 16); tests below may unwrap.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::ops::Range;

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A client request the gateway refuses to forward.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request body is larger than the gateway's limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    ReadBody(String),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("you must provide a model parameter")]
    MissingModel,
    #[error("invalid value for `{field}`: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
    #[error("missing required parameter `{0}`")]
    MissingField(&'static str),
    #[error("the request body must be JSON: send `Content-Type: application/json`")]
    NotJson,
    /// A Responses or Messages request a chat completions target cannot be given.
    #[error(transparent)]
    Translate(#[from] crate::translate::TranslateError),
}

/// An endpoint the gateway forwards to providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Rerank,
    /// OpenAI's Responses API, translated to chat completions for the target
    /// (`crate::translate::responses`).
    Responses,
    /// Anthropic's Messages API, translated to chat completions for the target
    /// (`crate::translate::messages`).
    Messages,
}

impl Endpoint {
    /// How many endpoints there are (for tables indexed by [`Endpoint::index`]).
    pub const COUNT: usize = 6;

    /// Every endpoint, in [`Endpoint::index`] order.
    pub const ALL: [Endpoint; Endpoint::COUNT] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Rerank,
        Endpoint::Responses,
        Endpoint::Messages,
    ];

    /// A dense index, `0..COUNT`.
    pub fn index(self) -> usize {
        match self {
            Endpoint::ChatCompletions => 0,
            Endpoint::Completions => 1,
            Endpoint::Embeddings => 2,
            Endpoint::Rerank => 3,
            Endpoint::Responses => 4,
            Endpoint::Messages => 5,
        }
    }

    /// The path under `/v1` a client sends the request to.
    pub fn suffix(self) -> &'static str {
        match self {
            Endpoint::Responses => "/responses",
            Endpoint::Messages => "/messages",
            other => other.upstream_suffix(),
        }
    }

    /// The path under a provider's base URL the request goes to: a translated request goes
    /// to the API it was translated to.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions | Endpoint::Responses | Endpoint::Messages => {
                "/chat/completions"
            }
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Rerank => "/rerank",
        }
    }

    /// Stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Rerank => "rerank",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
        }
    }

    /// The input field the endpoint cannot do without.
    pub(crate) fn required_field(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
            Endpoint::Rerank => "query",
            Endpoint::Responses => "input",
            Endpoint::Messages => "messages",
        }
    }

    /// Whether the client speaks another API than chat completions, and its request is
    /// translated (`LlmRequest::original` holds it).
    pub fn translated(self) -> bool {
        matches!(self, Endpoint::Responses | Endpoint::Messages)
    }

    /// Maps a request path (without query) to a forwarded endpoint.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.strip_suffix('/').unwrap_or(path) {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            "/v1/rerank" => Some(Endpoint::Rerank),
            "/v1/responses" => Some(Endpoint::Responses),
            "/v1/messages" => Some(Endpoint::Messages),
            _ => None,
        }
    }

    /// The token counting endpoint of an API (`POST /v1/messages/count_tokens`,
    /// `POST /v1/responses/input_tokens`): answered by the gateway, never forwarded.
    pub fn counting_path(path: &str) -> Option<Endpoint> {
        match path.strip_suffix('/').unwrap_or(path) {
            "/v1/messages/count_tokens" => Some(Endpoint::Messages),
            "/v1/responses/input_tokens" => Some(Endpoint::Responses),
            _ => None,
        }
    }
}

/// Completion tokens assumed for a request that sets no `max_tokens` (token budgets reserve
/// this much). A longer answer is still settled at its real size afterwards, so a key can
/// overshoot its budget by at most the excess of the requests it had in flight at once.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 512;

/// Most items one embeddings request may hold (OpenAI's own limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Largest `max_tokens` / `max_completion_tokens` accepted (2^31): far above any model's
/// context, and small enough that no estimate built on it can overflow a counter.
pub const MAX_TOKENS_LIMIT: u64 = 1 << 31;

/// A parsed client request: the original bytes and what the gateway needs from them.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub endpoint: Endpoint,
    pub raw: Bytes,
    pub model: String,
    /// Byte range of the `model` value (with its quotes) in `raw`, for splicing.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// `max_completion_tokens` or `max_tokens`, when the client set one.
    pub max_tokens: Option<u64>,
    /// Choices generated (`n`, or `best_of` when larger): each may use `max_tokens`.
    pub choices: u64,
    /// Byte range of the client's own `stream_options` value in `raw` (null included), when
    /// it set one (rewritten to ask for usage; see [`body_with_usage`]).
    pub stream_options_span: Option<Range<usize>>,
    /// `stream_options.include_usage: true` (a cached stream replays the usage chunk).
    pub include_usage: bool,
    /// The client's request as it came, when `raw` is its translation (a Responses or
    /// Messages request: the answer is translated back, and a `response` echoes it).
    pub original: Option<Arc<serde_json::Value>>,
    /// The fields of `original` its translation left out (for a response header).
    pub dropped: Vec<&'static str>,
    /// A token counting request: answered with the prompt's size, never forwarded.
    pub counting: bool,
    /// The prompt's tokens as the target's own tokenizer counted them (a sidecar target; see
    /// `upstream::tokenize`); `None`: estimated from the body's size.
    pub prompt_tokens: Option<u64>,
    /// The stored conversation a Responses request continues (its items, before its input).
    pub history: Option<Arc<Vec<serde_json::Value>>>,
    /// Why a Responses request cannot be translated for a chat completions target (a built-in
    /// tool…): only a provider that speaks the Responses API can serve it.
    pub untranslatable: Option<Box<crate::translate::TranslateError>>,
    /// The client's body size when `raw` is only a stand-in (a request no chat target can
    /// carry; 0 otherwise): its token estimate is taken from this, counted once at parse.
    pub untranslatable_len: usize,
}

impl LlmRequest {
    /// Tokens to reserve before forwarding: the prompt (counted by the target's tokenizer when
    /// it could be, else estimated from the body's size: about four bytes a token, an
    /// over-estimate for JSON with a cloud tokenizer), plus the completion budget
    /// (`max_tokens`, or `default_completion` when the client set none).
    pub fn token_estimate(&self, default_completion: u64) -> u64 {
        let (prompt, completion) = self.token_split(default_completion);
        prompt.saturating_add(completion)
    }

    /// [`token_estimate`](Self::token_estimate) as (prompt, completion): what dollar budgets
    /// price apart.
    pub fn token_split(&self, default_completion: u64) -> (u64, u64) {
        let prompt = self.prompt_tokens.unwrap_or_else(|| {
            // An untranslatable request's chat body is a stand-in: its own body is the prompt.
            let size = match self.untranslatable_len {
                0 => self.raw.len(),
                own => own,
            };
            (size as u64).div_ceil(4)
        });
        let completion = match self.endpoint {
            Endpoint::Embeddings | Endpoint::Rerank => 0,
            Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Responses
            | Endpoint::Messages => self
                .max_tokens
                .unwrap_or(default_completion)
                .saturating_mul(self.choices.max(1)),
        };
        (prompt, completion)
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    query: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    /// Choices asked for (chat, completions): each may use `max_tokens`.
    #[serde(default)]
    n: Option<serde_json::Value>,
    /// Completions generated server-side to pick the best from (legacy completions).
    #[serde(default)]
    best_of: Option<serde_json::Value>,
    /// Present even when `null` (an `Option` alone would read `null` as absent).
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses `raw` for `endpoint`: 400-class errors for anything a provider would refuse anyway.
/// A Responses or Messages request is translated to chat completions here (DESIGN.md step
/// 6): `raw` is then the translation, and `original` the client's request.
pub fn parse(endpoint: Endpoint, raw: Bytes) -> Result<LlmRequest, RequestError> {
    match endpoint {
        Endpoint::Responses => return parse_responses(raw),
        Endpoint::Messages => return parse_messages(raw, false),
        _ => {}
    }
    let first = raw.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(if first.is_none() {
            RequestError::InvalidJson("the body is empty".into())
        } else {
            RequestError::NotAnObject
        });
    }
    // Every field is a RawValue or a Value, so any error here is malformed JSON (or a
    // duplicated key, which providers would reject too).
    let head: Head =
        serde_json::from_slice(&raw).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let model_raw = head.model.ok_or(RequestError::MissingModel)?;
    let model: String = match serde_json::from_str(model_raw.get()) {
        Ok(m) => m,
        Err(_) if model_raw.get() == "null" => return Err(RequestError::MissingModel),
        Err(_) => {
            return Err(RequestError::InvalidField {
                field: "model",
                reason: "must be a string",
            })
        }
    };
    if model.is_empty() {
        return Err(RequestError::MissingModel);
    }
    let stream = match head.stream {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "stream",
                reason: "must be a boolean",
            })
        }
    };
    let required = match endpoint {
        Endpoint::ChatCompletions => head.messages,
        Endpoint::Completions => head.prompt,
        Endpoint::Embeddings => head.input,
        Endpoint::Rerank => head.query,
        Endpoint::Responses => head.input,
        Endpoint::Messages => head.messages,
    };
    match required.map(RawValue::get) {
        None | Some("null") => return Err(RequestError::MissingField(endpoint.required_field())),
        Some(v) if endpoint == Endpoint::ChatCompletions && !v.starts_with('[') => {
            return Err(RequestError::InvalidField {
                field: "messages",
                reason: "must be an array of messages",
            })
        }
        Some(v) if endpoint == Endpoint::Embeddings && v.starts_with('[') => {
            // Counted without building the items (each is skipped, not allocated).
            let items = serde_json::from_str::<Vec<serde::de::IgnoredAny>>(v)
                .map_err(|e| RequestError::InvalidJson(e.to_string()))?;
            if items.len() > MAX_EMBEDDING_INPUTS {
                return Err(RequestError::InvalidField {
                    field: "input",
                    reason: "may hold at most 2048 items",
                });
            }
        }
        Some(_) => {}
    }
    let model_span = span_in(&raw, model_raw.get());
    let max_completion_tokens =
        bounded_tokens("max_completion_tokens", head.max_completion_tokens)?;
    let max_tokens = bounded_tokens("max_tokens", head.max_tokens)?;
    let max_tokens = max_completion_tokens.or(max_tokens);
    // Every choice may use `max_tokens`: budgets reserve for all of them.
    let choices = bounded_count("n", head.n, MAX_CHOICES)?.max(bounded_count(
        "best_of",
        head.best_of,
        MAX_CHOICES,
    )?);
    // Kept even when null: `body_with_usage` replaces the value in place, so the forwarded
    // body never holds the key twice (readers keep the last one, which would opt out).
    let stream_options_span = head.stream_options.map(|v| span_in(&raw, v.get()));
    let include_usage = head.stream_options.is_some_and(|v| {
        serde_json::from_str::<serde_json::Value>(v.get())
            .is_ok_and(|o| o.get("include_usage") == Some(&serde_json::Value::Bool(true)))
    });
    Ok(Read {
        model,
        model_span,
        stream,
        max_tokens,
        choices,
        stream_options_span,
        include_usage,
    }
    .request(endpoint, raw))
}

/// What [`parse`] reads of a body (and `chat_request` of a translation's): the request
/// is this, with nothing of another API attached yet.
struct Read {
    model: String,
    model_span: Range<usize>,
    stream: bool,
    max_tokens: Option<u64>,
    choices: u64,
    stream_options_span: Option<Range<usize>>,
    include_usage: bool,
}

impl Read {
    fn request(self, endpoint: Endpoint, raw: Bytes) -> LlmRequest {
        LlmRequest {
            include_usage: self.include_usage,
            endpoint,
            model: self.model,
            model_span: self.model_span,
            stream: self.stream,
            max_tokens: self.max_tokens,
            choices: self.choices,
            stream_options_span: self.stream_options_span,
            raw,
            original: None,
            dropped: Vec::new(),
            counting: false,
            prompt_tokens: None,
            untranslatable_len: 0,
            history: None,
            untranslatable: None,
        }
    }
}

/// Parses `raw` for a token counting endpoint (`Endpoint::counting_path`): the API's request
/// (a Messages one without `max_tokens`), translated as if it were sent.
pub fn parse_counting(endpoint: Endpoint, raw: Bytes) -> Result<LlmRequest, RequestError> {
    let mut req = match endpoint {
        Endpoint::Messages => parse_messages(raw, true)?,
        _ => parse_responses(raw)?,
    };
    req.counting = true;
    req.stream = false;
    Ok(req)
}

/// A translated request's body as JSON: an object with a string `model`.
fn translated_body(raw: &[u8]) -> Result<serde_json::Value, RequestError> {
    let first = raw.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() {
        return Err(RequestError::InvalidJson("the body is empty".into()));
    }
    let request: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    if !request.is_object() {
        return Err(RequestError::NotAnObject);
    }
    match request.get("model") {
        None | Some(serde_json::Value::Null) => return Err(RequestError::MissingModel),
        Some(serde_json::Value::String(m)) if m.is_empty() => {
            return Err(RequestError::MissingModel)
        }
        Some(serde_json::Value::String(_)) => {}
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "model",
                reason: "must be a string",
            })
        }
    }
    Ok(request)
}

/// The chat translation of a client's request, parsed as a chat request, carrying the
/// original.
fn translated(
    endpoint: Endpoint,
    request: serde_json::Value,
    chat: serde_json::Value,
    dropped: Vec<&'static str>,
) -> Result<LlmRequest, RequestError> {
    let mut req = chat_request(chat)?;
    req.endpoint = endpoint;
    req.original = Some(Arc::new(request));
    req.dropped = dropped;
    Ok(req)
}

/// A translation's chat body, written out and read as [`parse`] reads a client's: written key
/// by key, noting where `model` and `stream_options` lie as it goes, instead of serialized and
/// then parsed again (that second parse was a fifth of a translated request's cost).
fn chat_request(chat: serde_json::Value) -> Result<LlmRequest, RequestError> {
    use serde_json::Value;
    let Value::Object(map) = chat else {
        return Err(RequestError::NotAnObject);
    };
    let model = match map.get("model") {
        None | Some(Value::Null) => return Err(RequestError::MissingModel),
        Some(Value::String(m)) if m.is_empty() => return Err(RequestError::MissingModel),
        Some(Value::String(m)) => m.clone(),
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "model",
                reason: "must be a string",
            })
        }
    };
    let stream = match map.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "stream",
                reason: "must be a boolean",
            })
        }
    };
    match map.get("messages") {
        None | Some(Value::Null) => return Err(RequestError::MissingField("messages")),
        Some(Value::Array(_)) => {}
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "messages",
                reason: "must be an array of messages",
            })
        }
    }
    let max_completion_tokens = bounded_tokens(
        "max_completion_tokens",
        map.get("max_completion_tokens").cloned(),
    )?;
    let max_tokens = bounded_tokens("max_tokens", map.get("max_tokens").cloned())?;
    let include_usage = map
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        == Some(&Value::Bool(true));
    let mut raw = Vec::with_capacity(1024);
    let mut model_span = 0..0;
    let mut stream_options_span = None;
    raw.push(b'{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            raw.push(b',');
        }
        let invalid = |e: serde_json::Error| RequestError::InvalidJson(e.to_string());
        serde_json::to_writer(&mut raw, key).map_err(invalid)?;
        raw.push(b':');
        let start = raw.len();
        serde_json::to_writer(&mut raw, value).map_err(invalid)?;
        match key.as_str() {
            "model" => model_span = start..raw.len(),
            "stream_options" => stream_options_span = Some(start..raw.len()),
            _ => {}
        }
    }
    raw.push(b'}');
    Ok(Read {
        model,
        model_span,
        stream,
        max_tokens: max_completion_tokens.or(max_tokens),
        choices: 1,
        stream_options_span,
        include_usage,
    }
    .request(Endpoint::ChatCompletions, Bytes::from(raw)))
}

/// A Messages request: checked, translated to a chat completions request, and that parsed.
fn parse_messages(raw: Bytes, counting: bool) -> Result<LlmRequest, RequestError> {
    let request = translated_body(&raw)?;
    if matches!(
        request.get("messages"),
        None | Some(serde_json::Value::Null)
    ) {
        return Err(RequestError::MissingField("messages"));
    }
    if !counting
        && matches!(
            request.get("max_tokens"),
            None | Some(serde_json::Value::Null)
        )
    {
        return Err(RequestError::MissingField("max_tokens"));
    }
    bounded_tokens("max_tokens", request.get("max_tokens").cloned())?;
    match crate::translate::messages::to_chat(&request, counting) {
        Ok(chat) => translated(Endpoint::Messages, request, chat.body, chat.dropped),
        // Anthropic-only blocks or server tools: refused at routing unless a target speaks the
        // Messages API (which takes it as is). A count of such a body is refused at once.
        Err(e @ crate::translate::TranslateError::Unsupported { .. }) if !counting => {
            untranslatable(Endpoint::Messages, request, raw.len(), e)
        }
        Err(e) => Err(e.into()),
    }
}

/// A request in another API that no chat target can carry (`e` says why): kept whole for a
/// target that speaks its API, with a minimal chat body beside it that is never forwarded
/// (`unsuited` passes every other target over; the cache leaves it alone).
fn untranslatable(
    endpoint: Endpoint,
    request: serde_json::Value,
    body_len: usize,
    e: crate::translate::TranslateError,
) -> Result<LlmRequest, RequestError> {
    let stream = request.get("stream").and_then(serde_json::Value::as_bool);
    // The chat body that travels with it: never sent (see above), only what the pipeline's
    // chat-shaped steps (routing, limits, the access log) read.
    let stand_in = serde_json::json!({
        "model": request.get("model"),
        "messages": [{"role": "user", "content": ""}],
        "stream": stream.unwrap_or(false),
    });
    let mut req = translated(endpoint, request, stand_in, Vec::new())?;
    req.untranslatable = Some(Box::new(e));
    req.untranslatable_len = body_len;
    Ok(req)
}

/// A Responses request: checked, translated to a chat completions request, and that parsed.
fn parse_responses(raw: Bytes) -> Result<LlmRequest, RequestError> {
    let request = translated_body(&raw)?;
    if matches!(request.get("input"), None | Some(serde_json::Value::Null)) {
        return Err(RequestError::MissingField("input"));
    }
    bounded_tokens(
        "max_output_tokens",
        request.get("max_output_tokens").cloned(),
    )?;
    match request.get("previous_response_id") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) => {}
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "previous_response_id",
                reason: "must be a string",
            })
        }
    }
    match crate::translate::responses::to_chat(&request, &[]) {
        Ok(chat) => translated(Endpoint::Responses, request, chat.body, chat.dropped),
        // Refused at routing unless a target speaks the Responses API (which takes it as is).
        Err(e @ crate::translate::TranslateError::Unsupported { .. }) => {
            untranslatable(Endpoint::Responses, request, raw.len(), e)
        }
        Err(e) => Err(e.into()),
    }
}

/// A Responses request that continues a stored one (`previous_response_id`): translated again
/// with the conversation so far (`history`, as Responses items) before its own input.
pub fn continued(
    req: LlmRequest,
    history: Vec<serde_json::Value>,
) -> Result<LlmRequest, RequestError> {
    let Some(original) = req.original.clone() else {
        return Ok(req);
    };
    if req.untranslatable.is_some() {
        // Only a provider that speaks the Responses API can serve it: it gets the history as
        // items (`forward::request`).
        let mut next = req;
        next.history = Some(Arc::new(history));
        return Ok(next);
    }
    let chat = crate::translate::responses::to_chat(&original, &history)?;
    let mut next = translated(
        Endpoint::Responses,
        (*original).clone(),
        chat.body,
        chat.dropped,
    )?;
    next.counting = req.counting;
    next.stream = req.stream;
    next.history = Some(Arc::new(history));
    Ok(next)
}

impl LlmRequest {
    /// The stored response a Responses request continues, if any.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.original
            .as_ref()?
            .get("previous_response_id")?
            .as_str()
    }
}

/// Where `part`, borrowed from `raw` (a RawValue of it), lies in it: a pointer difference.
fn span_in(raw: &[u8], part: &str) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(raw.as_ptr() as usize);
    start..start.saturating_add(part.len())
}

/// A token count field: absent or null, or an integer in `0..=MAX_TOKENS_LIMIT`. Anything
/// else is the client's error, named by field (a huge value must never reach a counter).
/// Most choices (`n`, `best_of`) one request may ask for (OpenAI's own limit for `n`).
pub const MAX_CHOICES: u64 = 128;

/// A count such as `n`: absent or null is 1; otherwise 1 to `max`.
fn bounded_count(
    field: &'static str,
    value: Option<serde_json::Value>,
    max: u64,
) -> Result<u64, RequestError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(RequestError::InvalidField {
                field,
                reason: "must be an integer from 1 to 128",
            }),
        },
    }
}

fn bounded_tokens(
    field: &'static str,
    value: Option<serde_json::Value>,
) -> Result<Option<u64>, RequestError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_TOKENS_LIMIT => Ok(Some(n)),
            Some(_) => Err(RequestError::InvalidField {
                field,
                reason: "must be at most 2147483648",
            }),
            None => Err(RequestError::InvalidField {
                field,
                reason: "must be a non-negative integer",
            }),
        },
    }
}

/// Bodies up to this size are sent upstream as one buffer (one copy, one write); larger ones
/// as three slices of the original (no copy; the extra writes are noise next to the transfer).
const COALESCE_LIMIT: usize = 64 * 1024;

/// The body to send upstream: the model value is replaced by `model_json` when the target
/// renames the model. Unchanged bodies share `req.raw`'s memory.
pub fn body_for_target(req: &LlmRequest, model_json: Option<&Bytes>) -> Vec<Bytes> {
    let Some(model) = model_json else {
        return vec![req.raw.clone()];
    };
    splice(req, model)
}

/// `stream_options` asking for a final usage chunk, added right after the body's `{`.
const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// Whether [`body_with_usage`] changes this request's `stream_options`: a chat or completions
/// stream whose client did not ask for the usage chunk itself. The forwarder then strips that
/// chunk from what the client receives (`usage::UsageStrip`).
pub fn adds_usage(req: &LlmRequest) -> bool {
    req.stream
        && !req.include_usage
        && matches!(
            req.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions
        )
}

/// Like [`body_for_target`], and for a stream whose client did not ask for usage, asks the
/// provider for the usage chunk: token budgets, quotas and the usage ledger settle on it, so a
/// client cannot opt out of accounting (`include_usage: false`). A client's own
/// `stream_options` keep their other fields; only `include_usage` is set.
pub fn body_with_usage(req: &LlmRequest, model_json: Option<&Bytes>) -> Vec<Bytes> {
    if !adds_usage(req) {
        return body_for_target(req, model_json);
    }
    let model = model_json
        .cloned()
        .unwrap_or_else(|| req.raw.slice(req.model_span.clone()));
    let mut body = bytes::BytesMut::with_capacity(
        req.raw
            .len()
            .saturating_add(INCLUDE_USAGE.len())
            .saturating_add(model.len()),
    );
    let mut edits: Vec<(Range<usize>, Bytes)> = vec![(req.model_span.clone(), model)];
    match &req.stream_options_span {
        Some(span) => {
            let own = req.raw.get(span.clone()).unwrap_or_default();
            let mut options =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(own)
                    .unwrap_or_default();
            options.insert("include_usage".into(), serde_json::Value::Bool(true));
            let rewritten = serde_json::to_vec(&options).unwrap_or_default();
            edits.push((span.clone(), Bytes::from(rewritten)));
        }
        None => {
            // The body starts with `{` (checked in `parse`), possibly after whitespace.
            let open = req
                .raw
                .iter()
                .position(|b| *b == b'{')
                .unwrap_or(0)
                .saturating_add(1);
            edits.push((open..open, Bytes::from_static(INCLUDE_USAGE)));
        }
    }
    edits.sort_by_key(|(span, _)| span.start);
    // The spans come from `parse` (inside `raw`, never overlapping), so `get` always finds them.
    let mut at = 0;
    for (span, with) in edits {
        body.extend_from_slice(req.raw.get(at..span.start).unwrap_or_default());
        body.extend_from_slice(&with);
        at = span.end;
    }
    body.extend_from_slice(req.raw.get(at..).unwrap_or_default());
    vec![body.freeze()]
}

fn splice(req: &LlmRequest, model: &Bytes) -> Vec<Bytes> {
    // `model_span` comes from `parse`, inside `raw`; were it not, the body goes unchanged.
    let (Some(head), Some(tail)) = (
        req.raw.get(..req.model_span.start),
        req.raw.get(req.model_span.end..),
    ) else {
        return vec![req.raw.clone()];
    };
    let len = head
        .len()
        .saturating_add(model.len())
        .saturating_add(tail.len());
    if len <= COALESCE_LIMIT {
        let mut body = bytes::BytesMut::with_capacity(len);
        body.extend_from_slice(head);
        body.extend_from_slice(model);
        body.extend_from_slice(tail);
        return vec![body.freeze()];
    }
    vec![
        req.raw.slice(..req.model_span.start),
        model.clone(),
        req.raw.slice(req.model_span.end..),
    ]
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

    fn chat(body: &str) -> Result<LlmRequest, RequestError> {
        parse(Endpoint::ChatCompletions, Bytes::from(body.to_string()))
    }

    /// A translation's chat body is read as `parse` would read it from its serialized form:
    /// the same fields, and spans over the same values.
    #[test]
    fn a_translated_chat_body_reads_as_parse_reads_it() {
        let bodies = [
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "a \"q\" \u{e9}\n"}],
                "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 64}),
            serde_json::json!({"model": "m", "messages": [], "max_completion_tokens": 9,
                "max_tokens": 5, "tools": [{"type": "function", "function": {"name": "model"}}]}),
            serde_json::json!({"model": "m", "messages": [], "stream_options": null}),
        ];
        for body in bodies {
            let direct = chat_request(body.clone()).unwrap();
            let parsed = chat(&serde_json::to_string(&body).unwrap()).unwrap();
            assert_eq!(direct.raw, parsed.raw);
            assert_eq!(direct.model, parsed.model);
            assert_eq!(direct.model_span, parsed.model_span);
            assert_eq!(direct.stream, parsed.stream);
            assert_eq!(direct.max_tokens, parsed.max_tokens);
            assert_eq!(direct.include_usage, parsed.include_usage);
            assert_eq!(direct.stream_options_span, parsed.stream_options_span);
        }
        for (body, field) in [
            (
                serde_json::json!({"model": "m", "messages": [], "stream": "yes"}),
                "stream",
            ),
            (serde_json::json!({"model": 1, "messages": []}), "model"),
            (
                serde_json::json!({"model": "m", "messages": {}}),
                "messages",
            ),
            (
                serde_json::json!({"model": "m", "messages": [], "max_tokens": -1}),
                "max_tokens",
            ),
        ] {
            match chat_request(body) {
                Err(RequestError::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn reads_model_and_stream() {
        let req =
            chat(r#"{"messages":[{"role":"user","content":"hi"}],"model":"fast","stream":true}"#)
                .unwrap();
        assert_eq!(req.model, "fast");
        assert!(req.stream);
        assert_eq!(&req.raw[req.model_span.clone()], br#""fast""#);
    }

    #[test]
    fn splices_the_target_model_without_touching_the_rest() {
        let req = chat(r#"{ "model" : "fast", "messages": [], "x": {"model": "keep"} }"#).unwrap();
        let pieces = body_for_target(&req, Some(&Bytes::from_static(br#""llama-3.1-8b""#)));
        assert_eq!(pieces.len(), 1, "small bodies go out in one piece");
        let joined: Vec<u8> = pieces.concat();
        assert_eq!(
            std::str::from_utf8(&joined).unwrap(),
            r#"{ "model" : "llama-3.1-8b", "messages": [], "x": {"model": "keep"} }"#
        );
    }

    #[test]
    fn refuses_bad_bodies_with_the_right_error() {
        assert!(matches!(chat(""), Err(RequestError::InvalidJson(_))));
        assert!(matches!(chat("[1,2]"), Err(RequestError::NotAnObject)));
        assert!(matches!(
            chat(r#"{"model": "a", "messages": [}"#),
            Err(RequestError::InvalidJson(_))
        ));
        assert!(matches!(
            chat(r#"{"messages": []}"#),
            Err(RequestError::MissingModel)
        ));
        assert!(matches!(
            chat(r#"{"model": 5, "messages": []}"#),
            Err(RequestError::InvalidField { field: "model", .. })
        ));
        assert!(matches!(
            chat(r#"{"model": "a"}"#),
            Err(RequestError::MissingField("messages"))
        ));
        assert!(matches!(
            chat(r#"{"model": "a", "messages": [], "stream": "yes"}"#),
            Err(RequestError::InvalidField {
                field: "stream",
                ..
            })
        ));
        assert!(chat(r#"{"model": "a", "model": "b", "messages": []}"#).is_err());
    }

    #[test]
    fn every_choice_is_reserved_for_and_absurd_counts_are_refused() {
        let req = chat(r#"{"model":"m","messages":[],"max_tokens":10,"n":4}"#).unwrap();
        assert_eq!(req.choices, 4);
        let prompt = req.token_split(0).0;
        assert_eq!(req.token_split(512), (prompt, 40));
        let req = parse(
            Endpoint::Completions,
            Bytes::from_static(br#"{"model":"m","prompt":"x","n":2,"best_of":5}"#),
        )
        .unwrap();
        assert_eq!(
            req.token_split(512).1,
            5 * 512,
            "best_of, with the default budget"
        );
        assert_eq!(
            chat(r#"{"model":"m","messages":[],"n":null}"#)
                .unwrap()
                .choices,
            1
        );
        for bad in ["0", "129", "-1", "1.5", "\"2\""] {
            let body = format!(r#"{{"model":"m","messages":[],"n":{bad}}}"#);
            assert!(
                matches!(
                    chat(&body),
                    Err(RequestError::InvalidField { field: "n", .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn usage_is_requested_for_streams_without_stream_options() {
        let req = chat(r#"{"model":"fast","stream":true,"messages":[],"max_tokens":7}"#).unwrap();
        assert_eq!(req.max_tokens, Some(7));
        let body: Vec<u8> = body_with_usage(&req, Some(&Bytes::from_static(br#""up""#))).concat();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "up");
        let own = chat(r#"{"model":"fast","stream":true,"messages":[],"stream_options":{"include_usage":false,"x":1}}"#).unwrap();
        let body: Vec<u8> = body_with_usage(&own, None).concat();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1}),
            "a client cannot opt out of usage; its other stream options are kept"
        );
        let asked = chat(r#"{"model":"fast","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(&body_with_usage(&asked, None).concat()[..], &asked.raw[..]);
        assert!(req.token_estimate(100) >= 7 + 10);
    }

    #[test]
    fn an_untranslatable_request_is_estimated_from_its_own_body_not_the_stand_in() {
        let text = "x".repeat(4000);
        let body = serde_json::json!({"model": "m", "max_tokens": 1,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "messages": [{"role": "user", "content": text}]});
        let raw = Bytes::from(serde_json::to_vec(&body).unwrap());
        let len = raw.len() as u64;
        let req = parse(Endpoint::Messages, raw).unwrap();
        assert!(req.untranslatable.is_some());
        assert!(req.raw.len() < 200, "the stand-in is small");
        assert_eq!(req.token_estimate(0), len.div_ceil(4));
    }

    #[test]
    fn absurd_token_counts_are_refused_by_name() {
        assert!(matches!(
            chat(r#"{"model":"a","messages":[],"max_tokens":18446744073709551615}"#),
            Err(RequestError::InvalidField {
                field: "max_tokens",
                ..
            })
        ));
        assert!(matches!(
            chat(r#"{"model":"a","messages":[],"max_completion_tokens":4294967296}"#),
            Err(RequestError::InvalidField {
                field: "max_completion_tokens",
                ..
            })
        ));
        assert!(matches!(
            chat(r#"{"model":"a","messages":[],"max_tokens":-1}"#),
            Err(RequestError::InvalidField {
                field: "max_tokens",
                ..
            })
        ));
        let ok = chat(r#"{"model":"a","messages":[],"max_tokens":2147483648}"#).unwrap();
        assert_eq!(ok.max_tokens, Some(1 << 31));
    }

    #[test]
    fn unicode_model_names_round_trip() {
        let req = chat(r#"{"model":"caf\u00e9","messages":[]}"#).unwrap();
        assert_eq!(req.model, "café");
    }
}
