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

use crate::affinity;
use crate::api::{self, ChatRequest, CompletionRequest, Generation, Prompt};
use crate::app::{blocking, App};
use crate::engine::{Event, Finish, GenerateJob, Job, TokenLogprob};
use crate::error::ApiError;
use crate::prompt;
use crate::tools::{self, CallParser, Found};

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
    let mut req: ChatRequest = api::parse(&body)?;
    // The model is looked up first so an unknown model is a 404 whatever else is wrong.
    let model = app.generation_model(&req.model)?.1.model.clone();
    let mut generation = api::generation(&req.fields, app.fresh_seed())?;
    let logprobs = req.logprobs()?;
    let mut messages = api::plain_messages(&req.messages)?;
    let prefixes = affinity::chain(&req.messages);
    let formatted = generation.sampling.grammar.is_some();
    let (tool_defs, choice) = (req.tools.take(), req.tool_choice.take());
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    // The tools' grammar (llama.cpp's schema converter, over client-given schemas) and the
    // template are CPU work: done off the async threads.
    let (plan, tokens) = blocking(move || {
        let plan = tools::plan(tool_defs.as_deref(), choice.as_ref(), parallel)?;
        if let Some(plan) = &plan {
            if formatted {
                return Err(ApiError::InvalidParam {
                    param: "response_format",
                    message: "response_format cannot be combined with tools unless tool_choice \
                              is \"none\""
                        .into(),
                });
            }
            api::instruct(&mut messages, plan);
        }
        let text = prompt::render_chat(&model, &messages)?;
        Ok((plan, prompt::tokenize(&model, &text, true)))
    })
    .await?;
    if let Some(plan) = &plan {
        generation.sampling.grammar = Some(plan.grammar.clone());
    }
    let options = Options {
        kind: Kind::Chat,
        default_max_tokens: None,
        logprobs,
        tools: plan.is_some(),
        prefixes,
    };
    start(app, req.model, tokens, generation, options).await
}

async fn completion_response(app: Arc<App>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = api::parse(&body)?;
    let model = app.generation_model(&req.model)?.1.model.clone();
    let generation = api::generation(&req.fields, app.fresh_seed())?;
    let logprobs = req.logprobs()?;
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
    let options = Options {
        kind: Kind::Text,
        default_max_tokens: Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        logprobs,
        tools: false,
        prefixes: Vec::new(),
    };
    start(app, req.model, tokens, generation, options).await
}

/// How one request is answered, besides its generation settings.
struct Options {
    kind: Kind,
    default_max_tokens: Option<u32>,
    /// `Some(k)`: log probabilities with `k` alternatives per token.
    logprobs: Option<u8>,
    /// The output is the tool-call JSON that `tools` describes, to be read as calls or text.
    tools: bool,
    /// The conversation's prefix hashes, for `/health` (`affinity`).
    prefixes: Vec<u64>,
}

/// Checks the context budget, queues the job, and answers in the requested form.
async fn start(
    app: Arc<App>,
    model_name: String,
    prompt: Vec<llama_cpp_2::token::LlamaToken>,
    generation: Generation,
    options: Options,
) -> Result<Response, ApiError> {
    let (handle, loaded) = app.generation_model(&model_name)?;
    let kind = options.kind;
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
    let max_tokens = match generation.max_tokens.or(options.default_max_tokens) {
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
            logprobs: options.logprobs,
            prefixes: options.prefixes,
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
        logprobs: options.logprobs.is_some(),
        tools: options.tools,
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
    /// The request asked for log probabilities: `logprobs` is an object, not null.
    logprobs: bool,
    /// The text is tool-call JSON to be read by a [`CallParser`].
    tools: bool,
}

/// What the text of a tool-using answer turned out to hold.
#[derive(Debug, Default)]
struct Calls {
    content: String,
    /// (name, arguments) per call, in order.
    calls: Vec<(String, String)>,
}

impl Calls {
    fn take(&mut self, found: Vec<Found>) {
        for f in found {
            match f {
                Found::Content(t) => self.content.push_str(&t),
                Found::Call { name, .. } => self.calls.push((name, String::new())),
                Found::Arguments { index, text } => {
                    if let Some(call) = self.calls.get_mut(index) {
                        call.1.push_str(&text);
                    }
                }
            }
        }
    }
}

impl Reply {
    fn usage(&self, completion_tokens: u32, cached_tokens: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + u64::from(completion_tokens),
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        })
    }

    /// A tool call's id: unique per response (the response id's serial part) and call.
    fn call_id(&self, index: usize) -> String {
        let serial = self.id.rsplit('-').next().unwrap_or("0");
        format!("call_{serial}{index:02}")
    }

    /// `finish_reason`: `tool_calls` when the model called a tool and stopped on its own.
    fn finish_reason(&self, finish: Finish, calls: usize) -> &'static str {
        match finish {
            Finish::Stop if calls > 0 => "tool_calls",
            f => f.as_str(),
        }
    }

    /// The `logprobs` field of a choice for these tokens: null when not asked for.
    fn logprobs_value(&self, tokens: &[TokenLogprob]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let top: Vec<Value> = t
                            .top
                            .iter()
                            .map(|(b, l)| json!({"token": text(b), "logprob": l, "bytes": b}))
                            .collect();
                        json!({"token": text(&t.bytes), "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Kind::Text => {
                let mut offset = 0usize;
                let mut offsets = Vec::with_capacity(tokens.len());
                for t in tokens {
                    offsets.push(offset);
                    offset += text(&t.bytes).chars().count();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let map: serde_json::Map<String, Value> =
                            t.top.iter().map(|(b, l)| (text(b), json!(l))).collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| text(&t.bytes)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    async fn collect(self, mut rx: mpsc::Receiver<Event>) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Logprob(l) => logprobs.push(l),
                Event::Failed(message) => return Err(ApiError::Internal(message)),
                Event::Done {
                    finish,
                    completion_tokens,
                    cached_tokens,
                } => {
                    let done = Done {
                        finish,
                        completion_tokens,
                        cached_tokens,
                    };
                    return Ok(axum::Json(self.body(&text, &logprobs, done)).into_response());
                }
            }
        }
        Err(ApiError::Internal(
            "the engine stopped before finishing the request".into(),
        ))
    }

    fn body(&self, text: &str, logprobs: &[TokenLogprob], done: Done) -> Value {
        let logprobs = self.logprobs_value(logprobs);
        let choice = match self.kind {
            Kind::Chat if self.tools => {
                let mut parser = CallParser::new();
                let mut calls = Calls::default();
                calls.take(parser.push(text));
                let tool_calls: Vec<Value> = calls
                    .calls
                    .iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        json!({"id": self.call_id(i), "type": "function", "function": {"name": name, "arguments": args}})
                    })
                    .collect();
                let mut message = json!({"role": "assistant", "content": null});
                if tool_calls.is_empty() {
                    message["content"] = Value::String(calls.content);
                } else {
                    message["tool_calls"] = Value::Array(tool_calls);
                }
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": self.finish_reason(done.finish, calls.calls.len()),
                })
            }
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": done.finish.as_str(),
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": done.finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(done.completion_tokens, done.cached_tokens),
        })
    }

    /// One chunk with a delta (or the final, empty delta with its finish reason).
    fn chunk(&self, delta: Delta, logprobs: &[TokenLogprob]) -> Value {
        let logprobs = if logprobs.is_empty() {
            Value::Null
        } else {
            self.logprobs_value(logprobs)
        };
        let (text, finish_reason) = match &delta {
            Delta::Text(t) => (Some(t.as_str()), None),
            Delta::Finish(reason) => (None, Some(*reason)),
            _ => (None, None),
        };
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match delta {
                    Delta::Text(t) => json!({"content": t}),
                    Delta::CallStart { index, name } => json!({"tool_calls": [{
                        "index": index,
                        "id": self.call_id(index),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }]}),
                    Delta::Arguments { index, text } => {
                        json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
                    }
                    Delta::Finish(_) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": logprobs,
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
        // Log probabilities wait for the text they belong with; tool-call JSON is read as it
        // comes and sent as content or call deltas.
        let mut pending: Vec<TokenLogprob> = Vec::new();
        let mut parser = self.tools.then(CallParser::new);
        let events = ReceiverStream::new(rx).map(move |event| {
            let bytes = match event {
                Event::Logprob(l) => {
                    pending.push(l);
                    String::new()
                }
                Event::Text(t) => match parser.as_mut() {
                    None => sse(&self.chunk(Delta::Text(t), &std::mem::take(&mut pending))),
                    Some(p) => {
                        let mut out = String::new();
                        for found in p.push(&t) {
                            let delta = match found {
                                Found::Content(t) => Delta::Text(t),
                                Found::Call { index, name } => Delta::CallStart { index, name },
                                Found::Arguments { index, text } => {
                                    Delta::Arguments { index, text }
                                }
                            };
                            out.push_str(&sse(&self.chunk(delta, &std::mem::take(&mut pending))));
                        }
                        out
                    }
                },
                Event::Done {
                    finish,
                    completion_tokens,
                    cached_tokens,
                } => {
                    let calls = parser.as_ref().map_or(0, CallParser::calls);
                    let reason = self.finish_reason(finish, calls);
                    let mut out =
                        sse(&self.chunk(Delta::Finish(reason), &std::mem::take(&mut pending)));
                    if include_usage {
                        let mut usage = self.envelope(Vec::new());
                        usage["usage"] = self.usage(completion_tokens, cached_tokens);
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

/// How a request ended, as `Event::Done` says it.
#[derive(Debug, Clone, Copy)]
struct Done {
    finish: Finish,
    completion_tokens: u32,
    cached_tokens: u32,
}

/// What one stream chunk carries.
enum Delta {
    Text(String),
    CallStart { index: usize, name: String },
    Arguments { index: usize, text: String },
    Finish(&'static str),
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
            logprobs: false,
            tools: false,
        }
    }

    fn done(finish: Finish, completion_tokens: u32) -> Done {
        Done {
            finish,
            completion_tokens,
            cached_tokens: 2,
        }
    }

    #[test]
    fn chat_body_has_exact_usage() {
        let b = reply(Kind::Chat).body("hi", &[], done(Finish::Length, 5));
        assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(b["object"], "chat.completion");
        assert_eq!(b["choices"][0]["message"]["content"], "hi");
        assert_eq!(b["choices"][0]["finish_reason"], "length");
        assert_eq!(b["usage"]["total_tokens"], 8);
    }

    #[test]
    fn chunks_carry_deltas_and_a_final_reason() {
        let r = reply(Kind::Chat);
        assert_eq!(
            r.chunk(Delta::Text("a".into()), &[])["choices"][0]["delta"]["content"],
            "a"
        );
        let last = r.chunk(Delta::Finish("stop"), &[]);
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["object"], "chat.completion.chunk");
        let t = reply(Kind::Text).chunk(Delta::Text("b".into()), &[]);
        assert_eq!(t["choices"][0]["text"], "b");
        assert_eq!(t["object"], "text_completion");
    }

    #[test]
    fn a_tool_answer_becomes_tool_calls_or_content() {
        let mut r = reply(Kind::Chat);
        r.tools = true;
        let b = r.body(
            r#"{"tool_calls": [{"name": "w", "arguments": {"city": "Oslo"}}]}"#,
            &[],
            done(Finish::Stop, 9),
        );
        let choice = &b["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "w");
        assert_eq!(call["function"]["arguments"], r#"{"city": "Oslo"}"#);
        assert!(call["id"].as_str().unwrap().starts_with("call_"));

        let b = r.body(r#"{"response": "It is cold."}"#, &[], done(Finish::Stop, 9));
        assert_eq!(b["choices"][0]["message"]["content"], "It is cold.");
        assert_eq!(b["choices"][0]["finish_reason"], "stop");
        assert!(b["choices"][0]["message"].get("tool_calls").is_none());
    }

    #[test]
    fn logprobs_take_openai_shapes() {
        let tokens = [TokenLogprob {
            bytes: b"Hi".to_vec(),
            logprob: -0.5,
            top: vec![(b"Hi".to_vec(), -0.5), (b"Yo".to_vec(), -1.5)],
        }];
        let mut r = reply(Kind::Chat);
        r.logprobs = true;
        let v = r.logprobs_value(&tokens);
        assert_eq!(v["content"][0]["token"], "Hi");
        assert_eq!(v["content"][0]["bytes"], json!([72, 105]));
        assert_eq!(v["content"][0]["top_logprobs"][1]["token"], "Yo");
        let mut r = reply(Kind::Text);
        r.logprobs = true;
        let v = r.logprobs_value(&tokens);
        assert_eq!(v["tokens"], json!(["Hi"]));
        assert_eq!(v["token_logprobs"], json!([-0.5]));
        assert_eq!(v["top_logprobs"][0]["Yo"], json!(-1.5));
        assert_eq!(v["text_offset"], json!([0]));
        assert_eq!(reply(Kind::Chat).logprobs_value(&tokens), Value::Null);
    }
}
