//! One request's spans: the server span, its attempts and lookups, and the W3C headers that
//! carry them on.

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::Span;

use super::tracer::Telemetry;

tokio::task_local! {
    /// The traced request whose task this is: a Redis call made on its behalf (on its task,
    /// not one spawned) becomes its child span.
    static CURRENT: Current;
}

/// What a request's task knows of its trace.
#[derive(Clone)]
pub struct Current {
    telemetry: Arc<Telemetry>,
    cx: Context,
}

/// Runs `work` as the traced request `current`'s. Only traced requests come here: an
/// untraced one awaits its work as is, so its future is not moved through this one's (a
/// request's future is some kilobytes, and every move of it is a copy).
pub fn within<F: std::future::Future>(
    current: Current,
    work: F,
) -> tokio::task::futures::TaskLocalFuture<Current, F> {
    CURRENT.scope(current, work)
}

/// A Redis call (`op`: `rate_limit`, `cache`, …) that took `elapsed` and ended now: a child
/// span of the request whose task made it, if that request is traced.
pub fn redis_call(op: &'static str, elapsed: std::time::Duration, failed: bool) {
    let _ = CURRENT.try_with(|current| {
        let end = SystemTime::now();
        let mut span = past_child(
            &current.telemetry,
            &current.cx,
            format!("redis {op}"),
            SpanKind::Client,
            end.checked_sub(elapsed).unwrap_or(end),
            vec![
                KeyValue::new("db.system.name", "redis"),
                KeyValue::new("lumen.redis.op", op),
            ],
        );
        if failed {
            span.set_attribute(KeyValue::new("error.type", "redis_error"));
            span.set_status(Status::error("the Redis call failed or timed out"));
        }
        span.end_with_timestamp(end);
    });
}

/// A child of `cx` that began at `start` (to be ended by the caller, now).
fn past_child(
    telemetry: &Telemetry,
    cx: &Context,
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<KeyValue>,
) -> Span {
    let tracer = &telemetry.tracer;
    tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, cx)
}

/// Longest prompt or answer recorded with `capture_content` (the rest is cut).
const CONTENT_LIMIT: usize = 32 * 1024;

/// The GenAI operation an endpoint performs (`gen_ai.operation.name`).
pub fn operation(endpoint: crate::openai::Endpoint) -> &'static str {
    use crate::openai::Endpoint;
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses | Endpoint::Messages => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
        Endpoint::Rerank => "rerank",
    }
}

/// A span context as W3C headers: `traceparent`, and `tracestate` when it has one.
pub fn w3c(sc: &SpanContext) -> (HeaderValue, Option<HeaderValue>) {
    let parent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8() & 1
    );
    let state = sc.trace_state().header();
    (
        HeaderValue::try_from(parent).unwrap_or(HeaderValue::from_static("")),
        (!state.is_empty())
            .then(|| HeaderValue::try_from(state).ok())
            .flatten(),
    )
}

/// What a finished request reports on its server span.
pub struct Finished<'a> {
    pub status: u16,
    pub endpoint: Option<crate::openai::Endpoint>,
    pub model: Option<&'a str>,
    pub route: &'a str,
    pub provider: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub usage: Option<(u64, u64)>,
    pub cached_tokens: u64,
    pub cache: Option<&'static str>,
    pub stream: bool,
    pub attempts: u32,
    pub error: Option<&'a str>,
    pub cost_micros: Option<u64>,
}

/// One request's trace.
pub struct RequestTrace {
    telemetry: Arc<Telemetry>,
    /// Holds the server span: its children's parent, and where its attributes go.
    cx: Context,
    /// Whether the server span is recorded (sampled): a request that is not builds no
    /// attributes and no names, only the ids its children carry on.
    recording: bool,
    /// The model was named (`model`): its attributes are on the span already.
    named: bool,
    /// The attempt whose answer the client got, ended with the request (its usage is known
    /// only then).
    committed: Option<Box<Attempt>>,
}

/// One upstream attempt's span. Dropped before it ended (a hedge that lost the race, a client
/// gone, a request abandoned), it ends marked `cancelled`.
pub struct Attempt {
    span: Span,
    model: String,
    ended: bool,
}

impl Telemetry {
    /// Starts the trace of a request whose head is `headers`, begun at `started`: a child of
    /// the client's `traceparent` when it sent a valid one.
    pub fn begin(
        self: &Arc<Self>,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        started: SystemTime,
    ) -> Box<RequestTrace> {
        let from_client = self
            .propagator
            .extract(&opentelemetry_http::HeaderExtractor(headers));
        // Not trusted: a client cannot choose what is recorded; its trace is only linked.
        let (parent, links) = if self.trust_traceparent {
            (from_client, Vec::new())
        } else {
            let theirs = from_client.span().span_context().clone();
            let links = if theirs.is_valid() {
                vec![Link::with_context(theirs)]
            } else {
                Vec::new()
            };
            (Context::new(), links)
        };
        let server = self
            .tracer
            .span_builder(format!("{method} {path}"))
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .with_links(links)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        let recording = server.is_recording();
        Box::new(RequestTrace {
            telemetry: self.clone(),
            cx: Context::new().with_span(server),
            recording,
            named: false,
            committed: None,
        })
    }
}

impl RequestTrace {
    /// What its task should know of it (see [`within`]); `None` when it is not recorded.
    pub fn current(&self) -> Option<Current> {
        self.recording.then(|| Current {
            telemetry: self.telemetry.clone(),
            cx: self.cx.clone(),
        })
    }

    /// Whether prompts are recorded.
    pub fn captures_content(&self) -> bool {
        self.telemetry.capture_content && self.recording
    }

    /// The server span's context as W3C headers (a job submitted by this request carries it).
    pub fn headers(&self) -> (HeaderValue, Option<HeaderValue>) {
        w3c(self.cx.span().span_context())
    }

    /// The model is known: the span is named for it, as the GenAI conventions name spans.
    pub fn model(&mut self, endpoint: crate::openai::Endpoint, model: &str) {
        if !self.recording {
            return;
        }
        let op = operation(endpoint);
        let span = self.cx.span();
        span.update_name(format!("{op} {model}"));
        span.set_attributes([
            KeyValue::new("gen_ai.operation.name", op),
            KeyValue::new("gen_ai.request.model", model.to_string()),
        ]);
        self.named = true;
    }

    /// The request's messages (or input), with `capture_content`.
    pub fn input(&mut self, body: &[u8]) {
        if !self.captures_content() {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        let input = ["messages", "input", "prompt"]
            .iter()
            .find_map(|k| v.get(*k).filter(|x| !x.is_null()));
        if let Some(input) = input {
            self.cx.span().set_attribute(KeyValue::new(
                "gen_ai.input.messages",
                cut(input.to_string()),
            ));
        }
    }

    /// The answer's messages, with `capture_content`: from a whole answer, its choices'
    /// messages (or text, or Anthropic's content); from a stream, the text its events carried
    /// (as far as it got, for one that was cut).
    pub fn output(&mut self, sse: bool, answer: &[u8]) {
        if !self.captures_content() {
            return;
        }
        let messages = match sse {
            true => streamed_text(answer).map(|text| {
                serde_json::json!([{"role": "assistant", "content": text}]).to_string()
            }),
            false => answered_messages(answer),
        };
        if let Some(messages) = messages {
            self.cx
                .span()
                .set_attribute(KeyValue::new("gen_ai.output.messages", cut(messages)));
        }
    }

    /// A child span that already happened (from `start` to now): a cache lookup, a wait.
    pub fn happened(&self, name: &'static str, start: SystemTime, attributes: Vec<KeyValue>) {
        if self.recording {
            let kind = SpanKind::Internal;
            past_child(&self.telemetry, &self.cx, name, kind, start, attributes).end();
        }
    }

    /// A job waited in the queue from `queued` to now (the run's trace).
    pub fn queue_wait(&self, queued: SystemTime) {
        self.happened("job queue wait", queued, Vec::new());
    }

    /// The response cache was asked (from `start` to now).
    pub fn cache_lookup(&self, start: SystemTime, hit: bool) {
        self.happened(
            "cache lookup",
            start,
            vec![KeyValue::new("lumen.cache.hit", hit)],
        );
    }

    /// Starts an attempt on `provider`'s `model` (at `host`, `name:port`). Not recorded, it
    /// still has the ids the provider is sent.
    pub fn attempt(
        &self,
        endpoint: crate::openai::Endpoint,
        provider: &str,
        host: &str,
        model: &str,
    ) -> Box<Attempt> {
        let tracer = &self.telemetry.tracer;
        if !self.recording {
            let span = tracer
                .span_builder("attempt")
                .start_with_context(tracer, &self.cx);
            return Box::new(Attempt {
                span,
                model: String::new(),
                ended: false,
            });
        }
        let op = operation(endpoint);
        let (address, port) = match host.rsplit_once(':') {
            Some((a, p)) if p.parse::<u16>().is_ok() => (a, p.parse::<i64>().ok()),
            _ => (host, None),
        };
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", op),
            KeyValue::new("gen_ai.provider.name", provider.to_string()),
            KeyValue::new("gen_ai.request.model", model.to_string()),
            KeyValue::new("server.address", address.to_string()),
        ];
        if let Some(port) = port {
            attributes.push(KeyValue::new("server.port", port));
        }
        let span = tracer
            .span_builder(format!("{op} {model}"))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &self.cx);
        Box::new(Attempt {
            span,
            model: model.to_string(),
            ended: false,
        })
    }

    /// The attempt whose answer goes to the client (with the provider's `status`).
    pub fn commit(&mut self, mut attempt: Box<Attempt>, status: u16) {
        attempt.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 400 {
            attempt.mark_failed(&status.to_string(), &status.to_string());
        }
        self.committed = Some(attempt);
    }

    /// Ends the trace: the committed attempt and the server span. A request that failed
    /// (an error status, or an answer cut after it began) is marked so on both.
    pub fn finish(mut self, done: &Finished<'_>) {
        let end = SystemTime::now();
        let failure = if done.status == 0 {
            Some("_OTHER".to_string())
        } else if done.status >= 400 {
            Some(done.status.to_string())
        } else {
            done.error.map(|_| "_OTHER".to_string())
        };
        // The model the answer came from: the committed attempt's target.
        let response_model = self
            .committed
            .as_ref()
            .filter(|_| self.recording)
            .map(|a| a.model.clone());
        if let Some(mut attempt) = self.committed.take() {
            if self.recording {
                let mut own = Vec::with_capacity(4);
                usage(done, &mut own);
                own.push(KeyValue::new(
                    "gen_ai.response.model",
                    attempt.model.clone(),
                ));
                attempt.span.set_attributes(own);
                // An error status was marked at commit; an answer cut later is marked here.
                if let (Some(kind), true) = (&failure, done.status < 400) {
                    attempt.mark_failed(kind, done.error.unwrap_or(""));
                }
            }
            attempt.span.end_with_timestamp(end);
            attempt.ended = true;
        }
        let span = self.cx.span();
        if self.recording {
            let mut kv: Vec<KeyValue> = Vec::with_capacity(14);
            kv.push(KeyValue::new(
                "http.response.status_code",
                i64::from(done.status),
            ));
            if !self.named {
                if let Some(e) = done.endpoint {
                    kv.push(KeyValue::new("gen_ai.operation.name", operation(e)));
                }
                if let Some(m) = done.model {
                    kv.push(KeyValue::new("gen_ai.request.model", m.to_string()));
                }
            }
            if !done.route.is_empty() {
                kv.push(KeyValue::new("lumen.route", done.route.to_string()));
            }
            if let Some(p) = done.provider.filter(|p| !p.is_empty()) {
                kv.push(KeyValue::new("gen_ai.provider.name", p.to_string()));
            }
            if let Some(k) = done.key_id.filter(|k| !k.is_empty()) {
                kv.push(KeyValue::new("lumen.key_id", k.to_string()));
            }
            if let Some(c) = done.cache {
                kv.push(KeyValue::new("lumen.cache", c));
            }
            if done.stream {
                kv.push(KeyValue::new("lumen.stream", true));
            }
            kv.push(KeyValue::new("lumen.attempts", i64::from(done.attempts)));
            if let Some(c) = done.cost_micros {
                kv.push(KeyValue::new("lumen.cost_usd", c as f64 / 1e6));
            }
            usage(done, &mut kv);
            if let Some(model) = response_model {
                kv.push(KeyValue::new("gen_ai.response.model", model));
            }
            if let Some(kind) = failure {
                kv.push(KeyValue::new("error.type", kind));
                span.set_status(Status::error(done.error.unwrap_or("").to_string()));
            }
            span.set_attributes(kv);
        }
        span.end_with_timestamp(end);
    }
}

/// The usage the provider reported, as the conventions name it.
fn usage(done: &Finished<'_>, kv: &mut Vec<KeyValue>) {
    let Some((input, output)) = done.usage else {
        return;
    };
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    kv.push(KeyValue::new("gen_ai.usage.input_tokens", int(input)));
    kv.push(KeyValue::new("gen_ai.usage.output_tokens", int(output)));
    if done.cached_tokens > 0 {
        kv.push(KeyValue::new(
            "gen_ai.usage.cache_read.input_tokens",
            int(done.cached_tokens),
        ));
    }
}

impl Attempt {
    /// The attempt's context as W3C headers, for the provider.
    pub fn headers(&self) -> (HeaderValue, Option<HeaderValue>) {
        w3c(self.span.span_context())
    }

    fn mark_failed(&mut self, why: &str, message: &str) {
        self.span
            .set_attribute(KeyValue::new("error.type", why.to_string()));
        self.span.set_status(Status::error(message.to_string()));
    }

    /// The attempt failed before anything reached the client (`why`: `timeout`, `connect`,
    /// `dropped`, `internal`, or the provider's status); another may follow.
    pub fn failed(mut self: Box<Self>, why: &str, message: &str) {
        self.mark_failed(why, message);
        if let Ok(status) = why.parse::<i64>() {
            self.span
                .set_attribute(KeyValue::new("http.response.status_code", status));
        }
        self.span.end();
        self.ended = true;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.ended && self.span.is_recording() {
            self.mark_failed("cancelled", "the attempt was given up before it ended");
        }
    }
}

/// A whole answer's messages as JSON: chat `choices[].message`, completions `choices[].text`,
/// Anthropic's `content`, the Responses API's `output`.
fn answered_messages(answer: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(answer).ok()?;
    if let Some(choices) = v["choices"].as_array() {
        let messages: Vec<serde_json::Value> = choices
            .iter()
            .filter_map(|c| match c.get("message") {
                Some(m) => Some(m.clone()),
                None => c["text"]
                    .as_str()
                    .map(|t| serde_json::json!({"role": "assistant", "content": t})),
            })
            .collect();
        return Some(serde_json::Value::Array(messages).to_string());
    }
    if let Some(content) = v.get("content").filter(|c| c.is_array()) {
        return Some(serde_json::json!([{"role": "assistant", "content": content}]).to_string());
    }
    v.get("output").map(|o| o.to_string())
}

/// The text a stream's events carried: chat `delta.content`, completions `text`, Anthropic's
/// `content_block_delta`, the Responses API's `response.output_text.delta`. `None` when no
/// event carried any.
fn streamed_text(answer: &[u8]) -> Option<String> {
    let mut text = String::new();
    let mut any = false;
    for line in answer.split(|b| *b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) else {
            continue;
        };
        let piece = v["choices"][0]["delta"]["content"]
            .as_str()
            .or_else(|| v["choices"][0]["text"].as_str())
            .or_else(|| v["delta"]["text"].as_str())
            .or_else(|| {
                (v["type"] == "response.output_text.delta").then(|| v["delta"].as_str())?
            });
        if let Some(piece) = piece {
            text.push_str(piece);
            any = true;
        }
    }
    any.then_some(text)
}

/// `text`, cut at [`CONTENT_LIMIT`] bytes (on a character boundary).
fn cut(mut text: String) -> String {
    if text.len() > CONTENT_LIMIT {
        let mut at = CONTENT_LIMIT;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

/// How long ago `since` was, as a wall-clock time (spans take wall-clock times).
pub fn wall_clock(since: std::time::Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(since.elapsed())
        .unwrap_or_else(SystemTime::now)
}

#[cfg(test)]
mod tests {
    use super::{answered_messages, streamed_text};

    #[test]
    fn answers_are_read_in_every_api_shape() {
        let chat = br#"{"choices":[{"message":{"role":"assistant","content":"hello"}}]}"#;
        assert_eq!(
            answered_messages(chat).unwrap(),
            r#"[{"content":"hello","role":"assistant"}]"#
        );
        let completion = br#"{"choices":[{"text":"once upon"}]}"#;
        assert!(answered_messages(completion).unwrap().contains("once upon"));
        let anthropic = br#"{"content":[{"type":"text","text":"bonjour"}]}"#;
        assert!(answered_messages(anthropic).unwrap().contains("bonjour"));
        assert_eq!(answered_messages(b"not json"), None);

        // Streams, split anywhere between events; the text of every event, in order.
        let chat = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"tok0 \"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"tok1\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(streamed_text(chat.as_bytes()).as_deref(), Some("tok0 tok1"));
        let anthropic = "event: content_block_delta\n\
                         data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n";
        assert_eq!(streamed_text(anthropic.as_bytes()).as_deref(), Some("hi"));
        let responses = "data: {\"type\":\"response.output_text.delta\",\"delta\":\"yo\"}\n\n";
        assert_eq!(streamed_text(responses.as_bytes()).as_deref(), Some("yo"));
        assert_eq!(streamed_text(b"data: [DONE]\n\n"), None);
    }
}
