//! `POST /v1/chat/completions` and `POST /v1/completions`: request → prompt tokens → engine job →
//! one JSON body, or an SSE stream of chunks ending in `data: [DONE]`.
//!
//! Everything that can be refused is refused before the job is queued (bad parameters, context
//! too long, queue full), so a stream that has started only fails if the engine does.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::api::{self, ChatRequest, CompletionRequest, Generation, Prompt};
use crate::app::{blocking, App};
use crate::engine::{Event, Finish, GenerateJob, Job};
use crate::error::ApiError;
use crate::prompt;

/// Events buffered per request between the engine and the HTTP writer. Small on purpose: a
/// client that stops reading pauses its own slot soon, not after a long run of wasted tokens.
const EVENT_CAPACITY: usize = 16;
/// OpenAI's default `max_tokens` for legacy completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// Which OpenAI object family a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

pub async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    chat_response(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    completion_response(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = api::parse(&body)?;
    // The model is looked up first so an unknown model is a 404 whatever else is wrong.
    let model = app.generation_model(&req.model)?.1.model.clone();
    let generation = api::generation(&req.fields, app.fresh_seed())?;
    let messages = api::plain_messages(&req.messages)?;
    let tokens = blocking(move || {
        let text = prompt::render_chat(&model, &messages)?;
        Ok(prompt::tokenize(&model, &text, true))
    })
    .await?;
    start(app, req.model, tokens, generation, Kind::Chat, None).await
}

async fn completion_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = api::parse(&body)?;
    let model = app.generation_model(&req.model)?.1.model.clone();
    let generation = api::generation(&req.fields, app.fresh_seed())?;
    let text = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::InvalidParam {
                param: "prompt",
                message: "only one prompt per request is supported".into(),
            })
        }
    };
    let tokens = blocking(move || Ok(prompt::tokenize(&model, &text, true))).await?;
    start(
        app,
        req.model,
        tokens,
        generation,
        Kind::Text,
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
    )
    .await
}

/// Checks the context budget, queues the job, and answers in the requested form.
async fn start(
    app: Arc<App>,
    model_name: String,
    prompt: Vec<llama_cpp_2::token::LlamaToken>,
    generation: Generation,
    kind: Kind,
    default_max_tokens: Option<u32>,
) -> Result<Response, ApiError> {
    let (handle, loaded) = app.generation_model(&model_name)?;
    let param = match kind {
        Kind::Chat => "messages",
        Kind::Text => "prompt",
    };
    if prompt.is_empty() {
        return Err(ApiError::InvalidParam {
            param,
            message: "the prompt is empty".into(),
        });
    }
    let limit = loaded.ctx_per_seq;
    let prompt_tokens = prompt.len() as u64;
    let room = u64::from(limit).saturating_sub(prompt_tokens);
    let max_tokens = match generation.max_tokens.or(default_max_tokens) {
        Some(m) if u64::from(m) <= room => m,
        // An explicit max_tokens that does not fit is refused, as OpenAI does; a default is cut
        // to what fits.
        Some(m) if generation.max_tokens.is_none() && room > 0 => m.min(room as u32),
        None if room > 0 => room as u32,
        requested => {
            let completion = u64::from(requested.unwrap_or(1));
            return Err(ApiError::ContextExceeded {
                param,
                limit,
                requested: prompt_tokens + completion,
                prompt: prompt_tokens,
                completion,
            });
        }
    };

    let (events, rx) = mpsc::channel(EVENT_CAPACITY);
    handle
        .submit(Job::Generate(GenerateJob {
            prompt,
            max_tokens,
            stop: generation.stop,
            sampling: generation.sampling,
            events,
        }))
        .map_err(|e| match e {
            crate::engine::SubmitError::QueueFull(m) => ApiError::QueueFull(m),
            crate::engine::SubmitError::Stopped(m) => {
                ApiError::Internal(format!("the engine for {m} has stopped"))
            }
        })?;

    let reply = Reply {
        id: app.next_id(match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }),
        created: app.now(),
        model: model_name,
        kind,
        prompt_tokens,
    };
    if generation.stream {
        Ok(reply.stream(rx, generation.include_usage))
    } else {
        reply.collect(rx).await
    }
}

/// What every chunk or body of one response repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: u64,
}

impl Reply {
    fn usage(&self, completion_tokens: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + u64::from(completion_tokens),
        })
    }

    async fn collect(self, mut rx: mpsc::Receiver<Event>) -> Result<Response, ApiError> {
        let mut text = String::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Failed(message) => return Err(ApiError::Internal(message)),
                Event::Done {
                    finish,
                    completion_tokens,
                } => {
                    return Ok(
                        axum::Json(self.body(&text, finish, completion_tokens)).into_response()
                    )
                }
            }
        }
        Err(ApiError::Internal(
            "the engine stopped before finishing the request".into(),
        ))
    }

    fn body(&self, text: &str, finish: Finish, completion_tokens: u32) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(completion_tokens),
        })
    }

    /// One chunk with a text delta (or the final, empty delta with its finish reason).
    fn chunk(&self, text: Option<&str>, finish: Option<Finish>) -> Value {
        let finish_reason = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        self.envelope(vec![choice])
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The SSE response. The body stream owns the event receiver: when the client disconnects,
    /// hyper drops the body, the receiver goes with it, and the engine frees the slot.
    fn stream(self, rx: mpsc::Receiver<Event>, include_usage: bool) -> Response {
        let opening = match self.kind {
            Kind::Chat => {
                let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                Some(sse(&self.envelope(vec![choice])))
            }
            Kind::Text => None,
        };
        let events = ReceiverStream::new(rx).map(move |event| {
            let bytes = match event {
                Event::Text(t) => sse(&self.chunk(Some(&t), None)),
                Event::Done {
                    finish,
                    completion_tokens,
                } => {
                    let mut out = sse(&self.chunk(None, Some(finish)));
                    if include_usage {
                        let mut usage = self.envelope(Vec::new());
                        usage["usage"] = self.usage(completion_tokens);
                        out.push_str(&sse(&usage));
                    }
                    out.push_str("data: [DONE]\n\n");
                    out
                }
                Event::Failed(message) => sse(&ApiError::Internal(message).body()),
            };
            Ok::<_, Infallible>(Bytes::from(bytes))
        });
        let body = tokio_stream::iter(opening.map(|o| Ok(Bytes::from(o)))).chain(events);
        let mut response = Response::new(Body::from_stream(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: Kind) -> Reply {
        Reply {
            id: "x-1".into(),
            created: 7,
            model: "m".into(),
            kind,
            prompt_tokens: 3,
        }
    }

    #[test]
    fn chat_body_has_exact_usage() {
        let b = reply(Kind::Chat).body("hi", Finish::Length, 5);
        assert_eq!(b["object"], "chat.completion");
        assert_eq!(b["choices"][0]["message"]["content"], "hi");
        assert_eq!(b["choices"][0]["finish_reason"], "length");
        assert_eq!(b["usage"]["total_tokens"], 8);
    }

    #[test]
    fn chunks_carry_deltas_and_a_final_reason() {
        let r = reply(Kind::Chat);
        assert_eq!(
            r.chunk(Some("a"), None)["choices"][0]["delta"]["content"],
            "a"
        );
        let last = r.chunk(None, Some(Finish::Stop));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["object"], "chat.completion.chunk");
        let t = reply(Kind::Text).chunk(Some("b"), None);
        assert_eq!(t["choices"][0]["text"], "b");
        assert_eq!(t["object"], "text_completion");
    }
}
