//! `POST /v1/embeddings` and `POST /v1/rerank`, for models loaded with a pooling type.
//!
//! The engine returns raw pooled vectors (or one relevance score per query/document pair for
//! rank pooling); this module tokenizes, checks lengths, and shapes the answer: L2 normalisation,
//! `dimensions` (truncate, then normalise again), `encoding_format`, rerank ordering.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::api::{self, EmbeddingInput, EmbeddingRequest, RerankRequest};
use crate::app::{blocking, App};
use crate::config::Pooling;
use crate::engine::{Capability, EmbedJob, Job, Loaded, ModelHandle, SubmitError};
use crate::error::ApiError;
use crate::prompt;

/// Most inputs (or documents) one request may carry; OpenAI's limit for embeddings.
const MAX_INPUTS: usize = 2048;

pub async fn embeddings(State(app): State<Arc<App>>, body: Bytes) -> Response {
    embeddings_response(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn rerank(State(app): State<Arc<App>>, body: Bytes) -> Response {
    rerank_response(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn embeddings_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = api::parse(&body)?;
    let handle = app.model(&req.model)?;
    match handle.capability {
        Capability::Embed(Pooling::Rank) => {
            return Err(ApiError::WrongModelKind {
                message: format!(
                    "model `{}` is loaded for reranking (pooling=rank); use /v1/rerank",
                    req.model
                ),
            })
        }
        Capability::Embed(_) => {}
        Capability::Chat => {
            return Err(ApiError::WrongModelKind {
                message: format!(
                    "model `{}` is loaded for generation; load it with pooling=mean (or cls, \
                     last) to serve embeddings",
                    req.model
                ),
            })
        }
    }
    let loaded = app.loaded(handle)?;
    let dims = match req.dimensions {
        None => loaded.n_embd,
        Some(d) if d >= 1 && (d as usize) <= loaded.n_embd => d as usize,
        Some(d) => {
            return Err(ApiError::InvalidParam {
                param: "dimensions",
                message: format!(
                    "dimensions must be between 1 and {}, got {d}",
                    loaded.n_embd
                ),
            })
        }
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::InvalidParam {
                param: "encoding_format",
                message: format!("encoding_format must be float or base64, got {other:?}"),
            })
        }
    };

    let model = loaded.model.clone();
    let inputs = blocking(move || tokenize_inputs(&model, req.input)).await?;
    check_inputs(&inputs, loaded, "input")?;
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = run(handle, inputs).await?;

    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, mut v)| {
            v.truncate(dims);
            normalize(&mut v);
            let embedding = if base64 {
                json!(encode_base64(&v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}

async fn rerank_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: RerankRequest = api::parse(&body)?;
    let handle = app.model(&req.model)?;
    if handle.capability != Capability::Embed(Pooling::Rank) {
        return Err(ApiError::WrongModelKind {
            message: format!(
                "model `{}` cannot rerank: rerankers are loaded with pooling=rank",
                req.model
            ),
        });
    }
    let loaded = app.loaded(handle)?;
    if req.documents.is_empty() || req.documents.len() > MAX_INPUTS {
        return Err(ApiError::InvalidParam {
            param: "documents",
            message: format!("give between 1 and {MAX_INPUTS} documents"),
        });
    }
    let model = loaded.model.clone();
    let query = req.query.clone();
    let docs: Vec<String> = req.documents.iter().map(|d| d.text().to_string()).collect();
    let pairs = blocking(move || {
        Ok(docs
            .iter()
            .map(|d| pair_tokens(&model, &query, d))
            .collect::<Vec<_>>())
    })
    .await?;
    check_inputs(&pairs, loaded, "documents")?;
    let prompt_tokens: usize = pairs.iter().map(Vec::len).sum();
    let scores: Vec<f32> = run(handle, pairs)
        .await?
        .iter()
        .map(|v| v.first().copied().unwrap_or(f32::NAN))
        .collect();

    let top_n = req.top_n.unwrap_or(scores.len()).min(scores.len());
    let return_documents = req.return_documents.unwrap_or(false);
    let results: Vec<Value> = ranking(&scores)
        .into_iter()
        .take(top_n)
        .map(|i| {
            let mut r = json!({"index": i, "relevance_score": scores[i]});
            if return_documents {
                r["document"] = json!({"text": req.documents[i].text()});
            }
            r
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "model": req.model,
        "results": results,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}

/// Queues one embedding job and waits for its vectors.
async fn run(
    handle: &ModelHandle,
    inputs: Vec<Vec<LlamaToken>>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let (reply, rx) = oneshot::channel();
    handle
        .submit(Job::Embed(EmbedJob { inputs, reply }))
        .map_err(|e| match e {
            SubmitError::QueueFull(m) => ApiError::QueueFull(m),
            SubmitError::Stopped(m) => {
                ApiError::Internal(format!("the engine for {m} has stopped"))
            }
        })?;
    rx.await
        .map_err(|_| ApiError::Internal("the engine stopped before answering".into()))?
        .map_err(ApiError::Internal)
}

fn tokenize_inputs(
    model: &LlamaModel,
    input: EmbeddingInput,
) -> Result<Vec<Vec<LlamaToken>>, ApiError> {
    let n_vocab = u32::try_from(model.n_vocab()).unwrap_or(0);
    let from_ids = |ids: Vec<u32>| -> Result<Vec<LlamaToken>, ApiError> {
        ids.into_iter()
            .map(|id| {
                if id < n_vocab {
                    Ok(LlamaToken(id as i32))
                } else {
                    Err(ApiError::InvalidParam {
                        param: "input",
                        message: format!("token id {id} is outside the vocabulary ({n_vocab})"),
                    })
                }
            })
            .collect()
    };
    match input {
        EmbeddingInput::One(text) => Ok(vec![prompt::tokenize(model, &text, true)]),
        EmbeddingInput::Many(texts) => Ok(texts
            .iter()
            .map(|t| prompt::tokenize(model, t, true))
            .collect()),
        EmbeddingInput::Tokens(ids) => Ok(vec![from_ids(ids)?]),
        EmbeddingInput::ManyTokens(lists) => lists.into_iter().map(from_ids).collect(),
    }
}

/// Every input must be non-empty and fit one slot's context.
fn check_inputs(
    inputs: &[Vec<LlamaToken>],
    loaded: &Loaded,
    param: &'static str,
) -> Result<(), ApiError> {
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(ApiError::InvalidParam {
            param,
            message: format!("give between 1 and {MAX_INPUTS} inputs"),
        });
    }
    for tokens in inputs {
        if tokens.is_empty() {
            return Err(ApiError::InvalidParam {
                param,
                message: "inputs must not be empty".into(),
            });
        }
        if tokens.len() > loaded.ctx_per_seq as usize {
            return Err(ApiError::ContextExceeded {
                param,
                limit: loaded.ctx_per_seq,
                requested: tokens.len() as u64,
                prompt: tokens.len() as u64,
                completion: 0,
            });
        }
    }
    Ok(())
}

/// A cross-encoder's input: the query with the model's own special tokens, a separator, the
/// document, and a closing separator (`[CLS] q [SEP] d [SEP]` for BERT rerankers).
fn pair_tokens(model: &LlamaModel, query: &str, doc: &str) -> Vec<LlamaToken> {
    let vocab = model.vocab();
    let sep = [vocab.sep(), vocab.eos()].into_iter().find(|t| t.0 >= 0);
    let mut tokens = prompt::tokenize(model, query, true);
    if let Some(sep) = sep {
        if tokens.last() != Some(&sep) {
            tokens.push(sep);
        }
    }
    tokens.extend(prompt::tokenize(model, doc, false));
    tokens.extend(sep);
    tokens
}

/// Scales to unit length; a zero vector stays zero.
fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// Little-endian f32s, base64: what OpenAI SDKs decode when they ask for `base64`.
fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Document indices by score, best first; ties keep document order; NaN scores sort last.
fn ranking(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => y.total_cmp(&x),
        }
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_unit_length() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn base64_round_trips_little_endian_floats() {
        let encoded = encode_base64(&[1.0, -0.5]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat()
        );
    }

    #[test]
    fn ranking_is_best_first_and_stable() {
        assert_eq!(
            ranking(&[0.1, 0.9, f32::NAN, 0.9, -1.0]),
            vec![1, 3, 0, 4, 2]
        );
    }
}
