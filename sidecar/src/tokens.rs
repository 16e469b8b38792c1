//! `POST /tokenize` and `POST /detokenize`, in llama-server's shapes, for counting tokens with
//! the model's own tokenizer instead of estimating them.
//!
//! `/tokenize` takes `content` (text, tokenized as `/v1/completions` would) or `messages` (a
//! chat, rendered through the model's template as `/v1/chat/completions` would, so the count is
//! the `prompt_tokens` that request would report; its `tools`, `tool_choice` and
//! `parallel_tool_calls` are counted as that request renders them) and answers `{"tokens":[…],"count":n}`, with
//! `"pieces"` when `with_pieces` is true (and without `"tokens"` when `with_tokens` is false). `/detokenize` takes `tokens` and answers `{"content"}`.
//! `model` may be left out when the server has one generation model.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::Deserialize;
use serde_json::json;

use crate::api::{self, ChatMessage};
use crate::app::{blocking, App};
use crate::engine::Capability;
use crate::error::ApiError;
use crate::prompt;
use crate::tools::{self, Tool, ToolChoice};

/// Most tokens `/detokenize` takes in one request.
const MAX_DETOKENIZE: usize = 1 << 20;

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    /// With `messages`: the chat's tools, counted as the chat request renders them.
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    /// BOS and the like, as the model's tokenizer adds them (default true, as completions do).
    #[serde(default)]
    add_special: Option<bool>,
    #[serde(default)]
    with_pieces: Option<bool>,
    /// `false`: the count alone, without the token ids (what the gateway asks for).
    #[serde(default)]
    with_tokens: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<i64>,
}

pub async fn tokenize(State(app): State<Arc<App>>, body: Bytes) -> Response {
    tokenize_response(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn detokenize(State(app): State<Arc<App>>, body: Bytes) -> Response {
    detokenize_response(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The named model, or the only generation model when none is named.
fn model_for(app: &App, name: Option<&str>) -> Result<Arc<LlamaModel>, ApiError> {
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let mut chat = app
                .models
                .values()
                .filter(|m| m.capability == Capability::Chat);
            match (chat.next(), chat.next()) {
                (Some(m), None) => m.alias.clone(),
                _ => {
                    return Err(ApiError::InvalidParam {
                        param: "model",
                        message: "name the model: this server has more or fewer than one \
                                  generation model"
                            .into(),
                    })
                }
            }
        }
    };
    let handle = app.model(&name)?;
    Ok(app.loaded(handle)?.model.clone())
}

async fn tokenize_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: TokenizeRequest = api::parse(&body)?;
    let model = model_for(&app, req.model.as_deref())?;
    let (text, messages) = match (req.content, req.messages) {
        (Some(text), None) => (Some(text), None),
        (None, Some(m)) => (None, Some(api::plain_messages(&m)?)),
        _ => {
            return Err(ApiError::InvalidParam {
                param: "content",
                message: "give exactly one of `content` (text) or `messages` (a chat)".into(),
            })
        }
    };
    let add_special = req.add_special.unwrap_or(true);
    let with_pieces = req.with_pieces.unwrap_or(false);
    let with_tokens = req.with_tokens.unwrap_or(true);
    let (tool_defs, choice) = (req.tools, req.tool_choice);
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    blocking(move || {
        let tokens = match (text, messages) {
            (Some(t), _) => prompt::tokenize(&model, &t, add_special),
            (None, Some(mut m)) => {
                // Tools are rendered into the prompt as the chat request renders them.
                if let Some(plan) = tools::plan(tool_defs.as_deref(), choice.as_ref(), parallel)? {
                    api::instruct(&mut m, &plan);
                }
                let rendered = prompt::render_chat(&model, &m)?;
                prompt::tokenize(&model, &rendered, true)
            }
            (None, None) => Vec::new(),
        };
        let ids: Vec<i32> = tokens.iter().map(|t| t.0).collect();
        let mut out = json!({"count": ids.len()});
        if with_tokens {
            out["tokens"] = json!(ids);
        }
        if with_pieces {
            let vocab = model.vocab();
            let pieces: Vec<String> = tokens
                .iter()
                .map(|&t| {
                    String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
                })
                .collect();
            out["pieces"] = json!(pieces);
        }
        Ok(axum::Json(out).into_response())
    })
    .await
}

async fn detokenize_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = api::parse(&body)?;
    let model = model_for(&app, req.model.as_deref())?;
    if req.tokens.len() > MAX_DETOKENIZE {
        return Err(ApiError::InvalidParam {
            param: "tokens",
            message: format!("at most {MAX_DETOKENIZE} tokens per request"),
        });
    }
    let n_vocab = i64::from(model.n_vocab());
    if let Some((i, t)) = req
        .tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| !(0..n_vocab).contains(&t))
    {
        return Err(ApiError::InvalidField {
            param: format!("tokens[{i}]"),
            message: format!("token {t} is outside the vocabulary (0 to {})", n_vocab - 1),
        });
    }
    blocking(move || {
        let vocab = model.vocab();
        let mut bytes = Vec::new();
        for &t in &req.tokens {
            // Checked against the vocabulary size above, which fits an i32.
            bytes.extend(vocab.token_to_piece(LlamaToken(t as i32), true, None));
        }
        let content = String::from_utf8_lossy(&bytes).into_owned();
        Ok(axum::Json(json!({ "content": content })).into_response())
    })
    .await
}
