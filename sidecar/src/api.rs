//! OpenAI request bodies as this server reads them, and their validation into engine settings.
//!
//! Lenient by design (unlike config): unknown fields are ignored, since SDKs send many we do not
//! act on. Fields we do act on are checked, and a bad value is a 400 naming the parameter.

use serde::Deserialize;

use crate::engine::Sampling;
use crate::error::ApiError;
use crate::grammar;
use crate::tools::{self, PastCall, Tool, ToolChoice};

/// Most stop strings one request may give.
const MAX_STOPS: usize = 16;
/// Longest stop sequence accepted.
const MAX_STOP_BYTES: usize = 256;
/// OpenAI's limits on alternatives per token: `top_logprobs` (chat) and `logprobs` (completions).
const MAX_TOP_LOGPROBS: i64 = 20;
const MAX_COMPLETION_LOGPROBS: i64 = 5;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
}

/// Sampling and stopping fields shared by chat and text completions.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationFields {
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// The newer name for `max_tokens` in chat completions; wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's tool calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<PastCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub fields: GenerationFields,
}

impl ChatRequest {
    /// `logprobs` / `top_logprobs` as the engine takes them: `Some(k)` when asked for.
    pub fn logprobs(&self) -> Result<Option<u8>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
            return Err(ApiError::InvalidParam {
                param: "top_logprobs",
                message: format!(
                    "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}"
                ),
            });
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as u8)),
            _ if self.top_logprobs.is_some_and(|t| t > 0) => Err(ApiError::InvalidParam {
                param: "top_logprobs",
                message: "top_logprobs needs logprobs: true".into(),
            }),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    /// Legacy completions: the number of alternatives per token, 0 to 5.
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub fields: GenerationFields,
}

impl CompletionRequest {
    pub fn logprobs(&self) -> Result<Option<u8>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(k) if (0..=MAX_COMPLETION_LOGPROBS).contains(&k) => Ok(Some(k as u8)),
            Some(k) => Err(ApiError::InvalidParam {
                param: "logprobs",
                message: format!(
                    "logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {k}"
                ),
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default)]
    pub dimensions: Option<u32>,
    #[serde(default)]
    pub encoding_format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    pub fn text(&self) -> &str {
        match self {
            Document::Text(t) | Document::Object { text: t } => t,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RerankRequest {
    pub model: String,
    pub query: String,
    pub documents: Vec<Document>,
    #[serde(default)]
    pub top_n: Option<usize>,
    #[serde(default)]
    pub return_documents: Option<bool>,
}

/// Parses a body into `T`, mapping serde's complaint to a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// A chat message flattened to what chat templates take.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainMessage {
    pub role: String,
    pub content: String,
}

/// Puts the tools' instructions into the system message (after the operator's own text, if
/// any), as a chat with tools is rendered.
pub fn instruct(messages: &mut Vec<PlainMessage>, plan: &tools::Plan) {
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{}", first.content, plan.instructions);
        }
        _ => messages.insert(
            0,
            PlainMessage {
                role: "system".into(),
                content: plan.instructions.clone(),
            },
        ),
    }
}

/// Text parts are joined; other parts (images, audio) are refused: these models read text only.
/// Roles are checked (`developer` is read as `system`, OpenAI's newer name for it); an
/// assistant turn's tool calls and `tool` turns are written as [`tools`] describes.
pub fn plain_messages(messages: &[ChatMessage]) -> Result<Vec<PlainMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::InvalidParam {
            param: "messages",
            message: "messages must not be empty".into(),
        });
    }
    let invalid = |param: String, message: String| ApiError::InvalidField { param, message };
    let mut call_ids: Vec<&str> = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let mut content = text_content(m.content.as_ref(), i)?;
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => {
                if let Some(calls) = m.tool_calls.as_deref().filter(|c| !c.is_empty()) {
                    call_ids.extend(calls.iter().map(|c| c.id.as_str()));
                    content = tools::past_calls_text(calls, &format!("messages[{i}]"))?;
                }
                "assistant"
            }
            "tool" => {
                let id = m.tool_call_id.as_deref().ok_or_else(|| {
                    invalid(
                        format!("messages[{i}].tool_call_id"),
                        "a message with role 'tool' needs tool_call_id".into(),
                    )
                })?;
                if !call_ids.contains(&id) {
                    return Err(invalid(
                        format!("messages[{i}].tool_call_id"),
                        format!(
                            "tool_call_id {id:?} answers no tool call of an earlier assistant \
                             message"
                        ),
                    ));
                }
                "tool"
            }
            other => {
                return Err(invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "role {other:?} is not one of system, developer, user, assistant, tool"
                    ),
                ))
            }
        };
        out.push(PlainMessage {
            role: role.to_string(),
            content,
        });
    }
    Ok(out)
}

/// A message's text: a string, or text parts joined; any other part is a 400 naming it.
fn text_content(content: Option<&Content>, i: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::InvalidField {
                            param: format!("messages[{i}].content[{j}].text"),
                            message: "a text content part needs `text`".into(),
                        })
                    }
                    (kind, _) => {
                        return Err(ApiError::InvalidField {
                            param: format!("messages[{i}].content[{j}].type"),
                            message: format!(
                                "content part of type {kind:?} is not supported; this model \
                                 reads text"
                            ),
                        })
                    }
                }
            }
            Ok(text)
        }
    }
}

/// Generation settings checked and resolved, except for `max_tokens`' default, which needs the
/// prompt length.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub sampling: Sampling,
}

/// Validates the shared fields. `seed_fallback` is used when the request gives no seed.
pub fn generation(f: &GenerationFields, seed_fallback: u32) -> Result<Generation, ApiError> {
    let invalid = |param: &'static str, message: String| ApiError::InvalidParam { param, message };
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = f.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(invalid(
            "top_k",
            format!("top_k must be 0 or more, got {top_k}"),
        ));
    }
    if f.n.is_some_and(|n| n != 1) {
        return Err(invalid(
            "n",
            "only n=1 is supported: this server generates one choice per request".into(),
        ));
    }
    let max_tokens = f.max_completion_tokens.or(f.max_tokens);
    if max_tokens == Some(0) {
        return Err(invalid(
            "max_tokens",
            "max_tokens must be at least 1".into(),
        ));
    }
    let stop = match &f.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS {
        return Err(invalid(
            "stop",
            format!("at most {MAX_STOPS} stop sequences are supported"),
        ));
    }
    // Stop strings are matched on the engine thread after every token; a long one would stall
    // every slot of the model.
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(invalid(
            "stop",
            format!("a stop sequence may be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    let grammar = match &f.response_format {
        None => None,
        Some(rf) => match rf.kind.as_str() {
            "text" => None,
            "json_object" => Some(grammar::JSON_OBJECT.to_string()),
            "json_schema" => {
                let schema = rf
                    .json_schema
                    .as_ref()
                    .and_then(|j| j.schema.as_ref())
                    .ok_or_else(|| {
                        invalid(
                            "response_format",
                            "json_schema needs json_schema.schema".into(),
                        )
                    })?;
                Some(grammar::from_json_schema(schema).map_err(|e| {
                    invalid("response_format", format!("unsupported JSON schema: {e}"))
                })?)
            }
            other => {
                return Err(invalid(
                    "response_format",
                    format!("response_format type {other:?} is not supported"),
                ))
            }
        },
    };
    let seed = match f.seed {
        // OpenAI seeds are 64-bit; llama.cpp's are 32-bit. Fold, so distinct seeds stay distinct
        // in practice.
        Some(s) => ((s as u64) ^ ((s as u64) >> 32)) as u32,
        None => seed_fallback,
    };
    Ok(Generation {
        stream: f.stream.unwrap_or(false),
        include_usage: f
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens,
        stop,
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            grammar,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> GenerationFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_openai() {
        let g = generation(&fields("{}"), 42).unwrap();
        assert!(!g.stream);
        assert_eq!(g.sampling.temperature, 1.0);
        assert_eq!(g.sampling.seed, 42);
        assert_eq!(g.max_tokens, None);
        assert!(g.stop.is_empty());
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        assert_eq!(
            generation(&fields(r#"{"stop":"x"}"#), 0).unwrap().stop,
            vec!["x"]
        );
        assert_eq!(
            generation(&fields(r#"{"stop":["a","b"]}"#), 0)
                .unwrap()
                .stop,
            vec!["a", "b"]
        );
        assert!(generation(&fields(r#"{"stop":null}"#), 0)
            .unwrap()
            .stop
            .is_empty());
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (json, param) in [
            (r#"{"temperature":3}"#, "temperature"),
            (r#"{"top_p":0}"#, "top_p"),
            (r#"{"top_k":-1}"#, "top_k"),
            (r#"{"n":2}"#, "n"),
            (r#"{"max_tokens":0}"#, "max_tokens"),
            (r#"{"response_format":{"type":"xml"}}"#, "response_format"),
        ] {
            match generation(&fields(json), 0) {
                Err(ApiError::InvalidParam { param: p, .. }) => assert_eq!(p, param, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn json_object_sets_the_json_grammar() {
        let g = generation(&fields(r#"{"response_format":{"type":"json_object"}}"#), 0).unwrap();
        assert_eq!(g.sampling.grammar.as_deref(), Some(grammar::JSON_OBJECT));
    }

    #[test]
    fn max_completion_tokens_wins() {
        let g = generation(&fields(r#"{"max_tokens":5,"max_completion_tokens":7}"#), 0).unwrap();
        assert_eq!(g.max_tokens, Some(7));
    }

    #[test]
    fn content_parts_are_joined_and_images_refused() {
        let msgs: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#,
        )
        .unwrap();
        assert_eq!(plain_messages(&msgs).unwrap()[0].content, "ab");
        assert!(plain_messages(&[]).is_err());
    }

    fn field_error(json: &str) -> String {
        let msgs: Vec<ChatMessage> = serde_json::from_str(json).unwrap();
        match plain_messages(&msgs) {
            Err(ApiError::InvalidField { param, .. }) => param,
            other => panic!("{json}: {other:?}"),
        }
    }

    #[test]
    fn bad_messages_name_the_field() {
        assert_eq!(
            field_error(
                r#"[{"role":"user","content":"a"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]}]"#
            ),
            "messages[1].content[1].type"
        );
        assert_eq!(
            field_error(r#"[{"role":"wizard","content":"a"}]"#),
            "messages[0].role"
        );
        assert_eq!(
            field_error(r#"[{"role":"tool","content":"a"}]"#),
            "messages[0].tool_call_id"
        );
        assert_eq!(
            field_error(r#"[{"role":"tool","content":"a","tool_call_id":"call_9"}]"#),
            "messages[0].tool_call_id"
        );
    }

    #[test]
    fn a_tool_round_trip_reads_as_the_model_wrote_it() {
        let msgs: Vec<ChatMessage> = serde_json::from_str(
            r#"[{"role":"developer","content":"be brief"},{"role":"user","content":"weather?"},
               {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"w","arguments":"{\"city\":\"Oslo\"}"}}]},
               {"role":"tool","tool_call_id":"call_1","content":"-3 C"}]"#,
        )
        .unwrap();
        let plain = plain_messages(&msgs).unwrap();
        assert_eq!(plain[0].role, "system");
        assert_eq!(
            plain[2].content,
            r#"{"tool_calls":[{"name":"w","arguments":{"city":"Oslo"}}]}"#
        );
        assert_eq!(
            (plain[3].role.as_str(), plain[3].content.as_str()),
            ("tool", "-3 C")
        );
    }

    #[test]
    fn logprobs_are_checked() {
        let chat = |json: &str| {
            parse::<ChatRequest>(format!(r#"{{"model":"m","messages":[],{json}}}"#).as_bytes())
                .unwrap()
                .logprobs()
        };
        assert_eq!(
            chat(r#""logprobs":true,"top_logprobs":3"#).unwrap(),
            Some(3)
        );
        assert_eq!(chat(r#""logprobs":false"#).unwrap(), None);
        assert!(chat(r#""logprobs":true,"top_logprobs":21"#).is_err());
        assert!(chat(r#""top_logprobs":2"#).is_err());
        let text = |json: &str| {
            parse::<CompletionRequest>(format!(r#"{{"model":"m","prompt":"p",{json}}}"#).as_bytes())
                .unwrap()
                .logprobs()
        };
        assert_eq!(text(r#""logprobs":2"#).unwrap(), Some(2));
        assert!(text(r#""logprobs":6"#).is_err());
    }

    #[test]
    fn embedding_inputs_of_every_shape() {
        for json in [r#""a""#, r#"["a","b"]"#, "[1,2,3]", "[[1],[2,3]]"] {
            let body = format!(r#"{{"model":"m","input":{json}}}"#);
            assert!(parse::<EmbeddingRequest>(body.as_bytes()).is_ok(), "{json}");
        }
    }

    #[test]
    fn rerank_documents_may_be_objects() {
        let r: RerankRequest =
            parse(br#"{"model":"m","query":"q","documents":["a",{"text":"b"}]}"#).unwrap();
        assert_eq!(r.documents[1].text(), "b");
    }
}
